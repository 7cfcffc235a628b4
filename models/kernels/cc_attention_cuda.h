// CUDA kernels of the three primitives: a grid-stride loop over the output elements, each computed
// by the per-element function of the common header (KIND: 0 energy, 1 gather, 2 scatter).
#ifndef CCA_CUDA_H
#define CCA_CUDA_H
template <typename T, typename Acc, int KIND>
__global__ void cca_elementwise_kernel(long n, const T* a, const T* b, T* out, int C, int TT, int H, int W) {
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)blockDim.x * gridDim.x) {
        if (KIND == 0) cca_energy_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else if (KIND == 1) cca_gather_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else cca_scatter_at<T, Acc>(idx, a, b, out, C, TT, H, W);
    }
}
#endif
