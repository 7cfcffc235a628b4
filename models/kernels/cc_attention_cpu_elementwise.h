// The CUDA kernels' arithmetic on CPU: one OpenMP iteration per output element, calling the same
// per-element functions (KIND: 0 energy, 1 gather, 2 scatter). Slow; it exists so that the CPU
// tests exercise what the GPU runs.
#ifndef CCA_CPU_ELEMENTWISE_H
#define CCA_CPU_ELEMENTWISE_H
template <typename T, typename Acc, int KIND>
void cca_cpu_elementwise(long n, const T* a, const T* b, T* out, int C, int TT, int H, int W) {
    #pragma omp parallel for schedule(static)
    for (long idx = 0; idx < n; ++idx) {
        if (KIND == 0) cca_energy_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else if (KIND == 1) cca_gather_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else cca_scatter_at<T, Acc>(idx, a, b, out, C, TT, H, W);
    }
}
#endif
