//! The kernels compiled into the binary: each `kernels/*.cu` file's fatbin (built by build.rs) and
//! the names of the kernels `Cuda::new` loads from it.

use super::lora::{LORA_DOWN, LORA_DOWN_WIDE, LORA_DU, LORA_OUTER, LORA_OUTER_WIDE};
use super::quant4::{GEMM_4BIT, GEMV_FEW_ROWS, GEMV_MANY, GEMV_MANY_LORA, GEMV_ONE_ROW, GEMV_SPLIT, GEMV_SWIGLU};
use super::xent::{XENT_REG, XENT_STREAM, XENT_TWO_PASS};

pub(super) mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Every kernel of a module (the names `Cuda::new` resolves).
pub(super) fn kernel_names(module: &str) -> &'static [&'static str] {
    match module {
        "adamw" => &["adamw_f32", "adamw_many_f32", "sum_squares_many_f32", "zero_many_f32"],
        "attention" => &["attention_fwd_f32", "attention_bwd_dq_f32", "attention_bwd_dkdv_f32"],
        "flash" => &[
            "flash_fwd_hd64",
            "flash_fwd_hd128",
            "flash_bwd_prep_hd64",
            "flash_bwd_prep_hd128",
            "flash_bwd_hd64",
            "flash_bwd_hd128",
        ],
        "flash_wgmma" => &["flash_fwd_wgmma_hd128", "flash_bwd_wgmma_hd128", "tma_probe"],
        "read_floor" => &["read_floor_u2", "read_floor_u4", "read_floor_u8", "read_floor_u16"],
        "decode_state" => &["argmax_f32", "decode_inputs_at_bf16", "decode_inputs_at_f16", "advance_position_f32"],
        "elementwise" => &[
            "add_f32",
            "add_assign_f32",
            "scale_f32",
            "add_uniform_noise_f32",
            "swiglu_f32",
            "swiglu_backward_f32",
            "swiglu_bf16",
            "swiglu_f16",
            "swiglu_backward_bf16",
            "swiglu_backward_f16",
            "swiglu_bf16_to_f32",
            "swiglu_f16_to_f32",
            "swiglu_backward_bf16_f32",
            "swiglu_backward_f16_f32",
            "f32_to_bf16",
            "scaled_f32_to_bf16_2d",
            "scaled_f32_to_f16_2d",
            "add_bf16_to_f32",
            "add_f16_to_f32",
            "add_two_bf16_to_f32",
            "add_two_f16_to_f32",
            "bf16_to_f32",
            "f16_to_f32",
            "dropout_f32",
            "dropout_add_f32",
            "embedding_bf16",
            "embedding_f16",
            "embedding_backward_f32",
            "sum_squares_f32",
            "non_finite_f32",
            "kv_write_f32",
        ],
        "nf4" => &[
            "dequant_4bit_f32",
            "dequant_4bit_f16",
            "dequant_4bit_bf16",
            "dequant_4bit_vec_f32",
            "dequant_4bit_vec_f16",
            "dequant_4bit_vec_bf16",
            "dequant_4bit_seg_f32",
            "dequant_4bit_seg_f16",
            "dequant_4bit_seg_ld_f16",
            "dequant_4bit_seg_ld_bf16",
            "dequant_4bit_seg_bf16",
            "f32_to_f16",
            "gemv_4bit_f32",
            GEMV_ONE_ROW[0],
            GEMV_ONE_ROW[1],
            GEMV_ONE_ROW[2],
            GEMV_ONE_ROW[3],
            GEMV_ONE_ROW[4],
            GEMV_ONE_ROW[5],
            GEMV_ONE_ROW[6],
            GEMV_ONE_ROW[7],
            GEMV_ONE_ROW[8],
            GEMV_FEW_ROWS[0],
            GEMV_FEW_ROWS[1],
            GEMV_FEW_ROWS[2],
            GEMV_SPLIT[0],
            GEMV_SPLIT[1],
            GEMV_SPLIT[2],
            GEMV_MANY[0],
            GEMV_MANY[1],
            GEMV_MANY[2],
            GEMV_MANY[3],
            GEMV_MANY[4],
            GEMV_MANY[5],
            GEMV_MANY_LORA[0],
            GEMV_MANY_LORA[1],
            GEMV_MANY_LORA[2],
            GEMV_MANY_LORA[3],
            GEMV_MANY_LORA[4],
            GEMV_MANY_LORA[5],
            GEMV_SWIGLU[0],
            GEMV_SWIGLU[1],
            GEMV_SWIGLU[2],
        ],
        "lora" => &["gemv_f32_many", "gemv_f32_long_rows_many"],
        "lora_fused" => &[
            LORA_DOWN[0],
            LORA_DOWN[1],
            LORA_DOWN[2],
            LORA_OUTER[0],
            LORA_OUTER[1],
            LORA_OUTER[2],
            LORA_DOWN_WIDE[0],
            LORA_DOWN_WIDE[1],
            LORA_OUTER_WIDE[0],
            LORA_OUTER_WIDE[1],
            LORA_DU[0][0],
            LORA_DU[0][1],
            LORA_DU[0][2],
            LORA_DU[1][0],
            LORA_DU[1][1],
            LORA_DU[1][2],
            "lora_sum_splits",
            "lora_up",
            "lora_up_from_bf16",
            "lora_up_from_f16",
            "lora_up_many_bf16",
            "lora_up_many_f16",
            "lora_up_acts_bf16",
            "lora_up_acts_f16",
        ],
        "nf4_gemm" => &[
            GEMM_4BIT[0],
            GEMM_4BIT[1],
            GEMM_4BIT[2],
            GEMM_4BIT[3],
            GEMM_4BIT[4],
            GEMM_4BIT[5],
            GEMM_4BIT[6],
            GEMM_4BIT[7],
            "gemm_4bit_reduce",
        ],
        "norm" => &[
            "rmsnorm_f32",
            "add_rmsnorm_f32",
            "add_rmsnorm_to_bf16",
            "add_rmsnorm_to_f16",
            "add16_rmsnorm_to_bf16",
            "add16_rmsnorm_to_f16",
            "add16_rmsnorm_bf16",
            "add16_rmsnorm_f16",
            "rmsnorm_backward_f32",
        ],
        "rope" => &[
            "rope_f32",
            "rope_bf16",
            "rope_bf16_from_bf16",
            "rope_bf16_from_f16",
            "rope_cache_f32",
            "lora_rope_cache_f32",
        ],
        "xent" => &[
            "cross_entropy_f32",
            XENT_REG[0],
            XENT_REG[1],
            XENT_REG[2],
            XENT_STREAM[0][0],
            XENT_STREAM[0][1],
            XENT_STREAM[0][2],
            XENT_STREAM[1][0],
            XENT_STREAM[1][1],
            XENT_STREAM[1][2],
            XENT_STREAM[2][0],
            XENT_STREAM[2][1],
            XENT_STREAM[2][2],
            XENT_TWO_PASS[0],
            XENT_TWO_PASS[1],
            XENT_TWO_PASS[2],
        ],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_names;

    /// Every kernel a `kernels/*.cu` file declares by a literal name is one `Cuda::new` resolves (a
    /// missing one fails only when it is first launched, on a GPU host); names made by macros (`name`,
    /// `prefix##SUFFIX`, or on the macro's next line) are listed through their name tables and not
    /// seen here.
    #[test]
    fn every_declared_kernel_is_registered_with_its_module() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("kernels/") {
            let path = entry.expect("a kernels/ entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("cu") {
                continue;
            }
            let module = path.file_stem().and_then(|s| s.to_str()).expect("a file name").to_string();
            let src = std::fs::read_to_string(&path).expect("a kernel source");
            for line in src.lines() {
                let Some(rest) = line.split("extern \"C\" __global__ void ").nth(1) else { continue };
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(r) => r.split_once(')').map_or("", |(_, after)| after).trim_start(),
                    None => rest,
                };
                let name = rest.split('(').next().unwrap_or("").trim();
                let identifier = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !identifier || name == "name" {
                    continue;
                }
                seen += 1;
                assert!(
                    kernel_names(&module).contains(&name),
                    "kernels/{module}.cu declares {name}, which kernel_names(\"{module}\") does not list"
                );
            }
        }
        assert!(seen > 40, "only {seen} kernel declarations found: the scan no longer matches the sources");
    }
}
