//! flex's fused kernels (`nodes/src/model/fused/kernels.rs`: the convolution's im2col + GEMM
//! backward, GroupNorm with FiLM and SiLU in one pass each way) against burn's own compositions
//! on flex, values and gradients.

use burn::tensor::Device;

mod common;

#[test]
fn should_match_burns_conv_gradients_with_flexs_fused_backward() {
    common::fused::conv2d_matches_burn(&Device::flex());
}

#[test]
fn should_match_burns_group_norm_with_flexs_fused_kernel() {
    common::fused::group_norm_matches_burn(&Device::flex());
}

#[test]
fn should_match_burns_group_norm_film_silu_with_flexs_fused_kernel() {
    common::fused::group_norm_film_silu_matches_burn(&Device::flex());
}

#[test]
fn should_match_burns_attention_with_flexs_fused_kernel() {
    common::fused::attention_matches_burn(&Device::flex());
}

#[test]
fn should_match_burns_layer_norm_with_flexs_group_norm_kernel() {
    common::fused::layer_norm_matches_burn(&Device::flex());
}
