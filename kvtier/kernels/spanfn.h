/* The one signature of a kernel on a codec's blocks (spans.h's run_spans, batched.c's SPAN
 * parts): one KV head's softmax pieces m, l (R) and o (R x D) over blocks [b0, b1) of the run
 * the job describes, for that head's R pre-scaled query rows q (R x D). */
#ifndef KVTIER_SPANFN_H
#define KVTIER_SPANFN_H
typedef void (*span_fn)(const void *job, const float *q, int h, int b0, int b1, int skip, float *m, float *l,
                        float *o);
#endif
