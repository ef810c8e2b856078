// The Python bindings of DASNet's kernels (wta.cpp, sparse_conv.cpp).
#include <torch/extension.h>

#include <vector>

at::Tensor wta_masked(const at::Tensor& x, int64_t keep, int64_t groups, bool nonnegative);
at::Tensor wta_winners(const at::Tensor& x, int64_t keep, int64_t groups, bool nonnegative);
std::vector<at::Tensor> wta_compact(const at::Tensor& x, int64_t keep, bool nonnegative);
at::Tensor add_channels(const at::Tensor& dense, const at::Tensor& channels, const at::Tensor& data);
at::Tensor pack_conv_weight(const at::Tensor& weight);
int64_t conv_block();
at::Tensor sparse_input_conv2d(const at::Tensor& x, const at::Tensor& channels, const at::Tensor& weight,
                               const at::Tensor& bias, int64_t cout, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                               int64_t ph, int64_t pw, bool relu);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wta_masked", &wta_masked, "x times the mask of each sample's top-k channel groups (inference)");
  m.def("wta_winners", &wta_winners, "each sample's top-k channel groups, ascending (inference)");
  m.def("wta_compact", &wta_compact, "each sample's top-k channels (ascending) and their maps (inference)");
  m.def("add_channels", &add_channels, "dense plus a compact activation scattered to its channels, in one pass");
  m.def("pack_conv_weight", &pack_conv_weight, "a conv weight packed for sparse_input_conv2d");
  m.def("conv_block", &conv_block, "output channels a packed weight block holds");
  m.def("sparse_input_conv2d", &sparse_input_conv2d,
        "a 2-D convolution over only the kept input channels (packed weight), channels-last, optional ReLU");
}
