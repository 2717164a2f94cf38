//! Frozen weights on the device: dense ones in a 16-bit dtype, 4-bit ones in bitsandbytes' layout
//! (packed codes and absmax, plain or double-quantized), uploaded once and read in place by the
//! kernels and GEMMs (quant4.rs, gemm.rs).

use crate::backend::HostWeight;
use crate::config::{ComputeDtype, QuantType};
use crate::quant::{Absmax, Quant4};
use cudarc::driver::{CudaSlice, CudaStream};
use half::{bf16, f16};
use std::sync::Arc;

/// A frozen weight on the device.
pub enum CudaWeight {
    /// `(rows, cols)`, fp16 when every value is exactly an fp16 (an fp16 checkpoint), else bf16.
    Dense { rows: usize, cols: usize, data: DenseData },
    Quant4 {
        rows: usize,
        cols: usize,
        quant_type: QuantType,
        blocksize: usize,
        compute: ComputeDtype,
        /// `ceil(rows·cols/2)` bytes, element 2j in the high nibble.
        packed: CudaSlice<u8>,
        absmax: DeviceAbsmax,
    },
}

pub enum DenseData {
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

pub enum DeviceAbsmax {
    F32(CudaSlice<f32>),
    Nested { q: CudaSlice<u8>, absmax2: CudaSlice<f32>, offset: f32 },
}

impl CudaWeight {
    pub(super) fn shape(&self) -> (usize, usize) {
        match self {
            CudaWeight::Dense { rows, cols, .. } | CudaWeight::Quant4 { rows, cols, .. } => (*rows, *cols),
        }
    }

    /// A host weight copied to the device: a dense one in fp16 when every value is exactly an fp16
    /// (an fp16 checkpoint), else bf16; a 4-bit one in the bitsandbytes layout as it is.
    pub(super) fn upload(stream: &Arc<CudaStream>, w: HostWeight) -> Self {
        match w {
            HostWeight::Dense { rows, cols, data } => {
                // Keep an fp16 checkpoint's values exact; anything else goes to bf16 (its range).
                let data = if data.iter().all(|&x| f16::from_f32(x).to_f32() == x) {
                    let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                    DenseData::F16(ck!(stream.clone_htod(&h), "upload weight"))
                } else {
                    let b: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                    DenseData::BF16(ck!(stream.clone_htod(&b), "upload weight"))
                };
                CudaWeight::Dense { rows, cols, data }
            }
            HostWeight::Quant4 { rows, cols, q, compute } => {
                let absmax = match &q.absmax {
                    Absmax::F32(a) => DeviceAbsmax::F32(ck!(stream.clone_htod(a), "upload absmax")),
                    Absmax::Nested { q, absmax2, offset } => DeviceAbsmax::Nested {
                        q: ck!(stream.clone_htod(q), "upload absmax"),
                        absmax2: ck!(stream.clone_htod(absmax2), "upload absmax"),
                        offset: *offset,
                    },
                };
                CudaWeight::Quant4 {
                    rows,
                    cols,
                    quant_type: q.quant_type,
                    blocksize: q.blocksize,
                    compute,
                    packed: ck!(stream.clone_htod(&q.packed), "upload weight"),
                    absmax,
                }
            }
        }
    }

    /// The weight copied back to the host, as [`CudaWeight::upload`] took it (dense values widened to f32).
    pub(super) fn to_host(&self, stream: &Arc<CudaStream>) -> HostWeight {
        match self {
            CudaWeight::Dense { rows, cols, data } => {
                let data: Vec<f32> = match data {
                    DenseData::BF16(d) => {
                        ck!(stream.clone_dtoh(d), "download weight").iter().map(|x| x.to_f32()).collect()
                    }
                    DenseData::F16(d) => {
                        ck!(stream.clone_dtoh(d), "download weight").iter().map(|x| x.to_f32()).collect()
                    }
                };
                HostWeight::Dense { rows: *rows, cols: *cols, data }
            }
            CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax } => {
                let absmax = match absmax {
                    DeviceAbsmax::F32(a) => Absmax::F32(ck!(stream.clone_dtoh(a), "download")),
                    DeviceAbsmax::Nested { q, absmax2, offset } => Absmax::Nested {
                        q: ck!(stream.clone_dtoh(q), "download"),
                        absmax2: ck!(stream.clone_dtoh(absmax2), "download"),
                        offset: *offset,
                    },
                };
                let q = Quant4 {
                    quant_type: *quant_type,
                    blocksize: *blocksize,
                    n: rows * cols,
                    packed: ck!(stream.clone_dtoh(packed), "download"),
                    absmax,
                };
                HostWeight::Quant4 { rows: *rows, cols: *cols, q, compute: *compute }
            }
        }
    }
}
