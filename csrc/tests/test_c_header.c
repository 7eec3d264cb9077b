/* The public header as strict C99 (-std=c99 -pedantic -Werror): a linear merge, a TIES merge with
 * default params and an error, called from C. */
#include <stdio.h>
#include <string.h>

#include "fusion_engine/fusion_engine.h"

int main(void) {
    float a[3] = {1.0f, 2.0f, 3.0f}, b[3] = {3.0f, 2.0f, 1.0f}, y[3] = {0.0f, 0.0f, 0.0f};
    const int64_t shape[1] = {3};
    fe_tensor_view in[2];
    fe_tensor_view out = fe_tensor_view_make(y, FE_DTYPE_F32, 1, shape);
    fe_linear_params lp = fe_linear_default_params();
    fe_ties_params tp = fe_ties_default_params();
    fe_status status;
    int failures = 0;

    in[0] = fe_tensor_view_make(a, FE_DTYPE_F32, 1, shape);
    in[1] = fe_tensor_view_make(b, FE_DTYPE_F32, 1, shape);
    status = fe_linear_merge(in, 2, &lp, &out);
    if (status != FE_OK || y[0] != 2.0f || y[1] != 2.0f || y[2] != 2.0f) {
        printf("fe_linear_merge: %s (%s)\n", fe_status_string(status), fe_last_error());
        failures++;
    }
    tp.density = 0.5;
    status = fe_ties_merge(&in[0], &in[1], 1, &tp, &out); /* base a, one model b */
    if (status != FE_OK) {
        printf("fe_ties_merge: %s\n", fe_last_error());
        failures++;
    }
    status = fe_linear_merge(in, 0, NULL, &out);
    if (status != FE_ERR_INVALID_ARGUMENT || strstr(fe_last_error(), "at least one tensor") == NULL) {
        printf("K == 0 was not rejected: %s\n", fe_status_string(status));
        failures++;
    }
    printf("test_c_header: libfusion_engine %s (%s), %d failures\n", fe_version(), fe_cpu_simd_level(), failures);
    return failures == 0 ? 0 : 1;
}
