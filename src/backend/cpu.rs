//! The reference backend: every op in plain Rust over `Vec<T>`, `T` = f32 (a slow but real trainer)
//! or f64 (the oracle for finite-difference gradient checks). Matrix products go through
//! `matrixmultiply`; everything else is a readable loop. GPU kernels are compared with this file.

use super::{
    adam_value, mlp_backward_composed, mlp_down_composed, mlp_gate_up_composed, AdamWStep, AttnShape, Backend, Dropout,
    HostWeight, RopeTables,
};
use crate::config::ComputeDtype;
use crate::quant::Quant4;
use num_traits::Float;
use rayon::prelude::*;
use std::marker::PhantomData;

/// The float types the CPU backend runs in.
pub trait Real: Float + Default + Send + Sync + std::fmt::Debug + std::iter::Sum + 'static {
    /// `C (m×n) = alpha · A (m×k) · B (k×n) + beta · C`, all with explicit (row, col) strides.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        a_strides: (isize, isize),
        b: &[Self],
        b_strides: (isize, isize),
        beta: Self,
        c: &mut [Self],
        c_strides: (isize, isize),
    );
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                (rsa, csa): (isize, isize),
                b: &[Self],
                (rsb, csb): (isize, isize),
                beta: Self,
                c: &mut [Self],
                (rsc, csc): (isize, isize),
            ) {
                if m == 0 || n == 0 {
                    return;
                }
                // Bounds: the largest index each operand touches must lie inside its slice.
                let last = |r: usize, c: usize, rs: isize, cs: isize| {
                    (r.saturating_sub(1)) as isize * rs + (c.saturating_sub(1)) as isize * cs
                };
                assert!(k == 0 || (last(m, k, rsa, csa) as usize) < a.len(), "gemm: A out of bounds");
                assert!(k == 0 || (last(k, n, rsb, csb) as usize) < b.len(), "gemm: B out of bounds");
                assert!((last(m, n, rsc, csc) as usize) < c.len(), "gemm: C out of bounds");
                // SAFETY: the asserts above keep every access of the kernel inside the slices.
                unsafe {
                    $gemm(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), rsc, csc)
                }
            }
            fn of(x: f64) -> Self {
                x as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
        }
    };
}
impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);

/// A frozen weight on the CPU: dense, or 4-bit (expanded once at upload while the budget lasts, else a
/// slab of rows at a time when used).
#[derive(Debug, Clone)]
pub enum CpuWeight<T> {
    Dense {
        rows: usize,
        cols: usize,
        data: Vec<T>,
    },
    /// `expanded`: the weight's values as products use them (dequantized, rounded to `compute`), made
    /// once at upload while the process's [`expansion_budget`] lasts; `None`: expanded slab by slab
    /// in every product.
    Quant4 {
        rows: usize,
        cols: usize,
        q: Quant4,
        compute: ComputeDtype,
        expanded: Option<Expanded<T>>,
    },
}

/// Bytes of expanded 4-bit weights held by every CPU model of the process.
static EXPANDED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many bytes of expanded 4-bit weights the CPU backend holds at most: `LLAMATUNE_CPU_EXPAND_MB`
/// (default 4096; 0 keeps every weight compressed). SmolLM2-135M takes ~0.5 GB; a 7B model (~27 GB in
/// f32) gets its first layers expanded and keeps the rest compressed.
pub fn expansion_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mb = std::env::var("LLAMATUNE_CPU_EXPAND_MB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(4096);
        mb << 20
    })
}

/// A 4-bit weight's values as its products use them, held for the weight's life (its bytes count
/// against [`expansion_budget`] until it is dropped). Expanding every 256-row slab in every product
/// cost more than the product itself (`cpu_ops` bench: NF4 linear 2.2× the dense one).
pub struct Expanded<T>(Vec<T>);

impl<T: Real> Expanded<T> {
    /// `q`'s values rounded to `compute`, if the budget has room for them.
    fn try_new(q: &Quant4, compute: ComputeDtype) -> Option<Self> {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = q.n * std::mem::size_of::<T>();
        EXPANDED_BYTES
            .fetch_update(Relaxed, Relaxed, |used| (used + bytes <= expansion_budget()).then_some(used + bytes))
            .ok()?;
        let mut data = vec![T::zero(); q.n];
        expand_range(q, compute, 0, &mut data);
        Some(Expanded(data))
    }
}

impl<T: Clone> Clone for Expanded<T> {
    /// A copy counts against the budget as well (it may go over it: a weight's copy stays usable).
    fn clone(&self) -> Self {
        EXPANDED_BYTES.fetch_add(self.0.len() * std::mem::size_of::<T>(), std::sync::atomic::Ordering::Relaxed);
        Expanded(self.0.clone())
    }
}

impl<T> Drop for Expanded<T> {
    fn drop(&mut self) {
        EXPANDED_BYTES.fetch_sub(self.0.len() * std::mem::size_of::<T>(), std::sync::atomic::Ordering::Relaxed);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Expanded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expanded({} values)", self.0.len())
    }
}

impl<T: Real> CpuWeight<T> {
    fn shape(&self) -> (usize, usize) {
        match self {
            CpuWeight::Dense { rows, cols, .. } | CpuWeight::Quant4 { rows, cols, .. } => (*rows, *cols),
        }
    }

    /// The precision a matmul with this weight computes in (dense weights: the backend's own).
    fn compute(&self) -> ComputeDtype {
        match self {
            CpuWeight::Dense { .. } => ComputeDtype::F32,
            CpuWeight::Quant4 { compute, .. } => *compute,
        }
    }

    /// Calls `f(first_row, rows_slab)` over row slabs of the weight (a borrowed view when dense or
    /// expanded at upload, else a freshly dequantized slab, so that the weight is never expanded whole).
    fn for_each_slab(&self, mut f: impl FnMut(usize, &[T])) {
        match self {
            CpuWeight::Dense { data, .. } => f(0, data),
            CpuWeight::Quant4 { expanded: Some(e), .. } => f(0, &e.0),
            CpuWeight::Quant4 { rows, cols, q, compute, expanded: None } => {
                const SLAB_ROWS: usize = 256;
                let mut tmp: Vec<T> = vec![T::zero(); SLAB_ROWS.min(*rows) * cols];
                let mut r0 = 0;
                while r0 < *rows {
                    let nr = SLAB_ROWS.min(rows - r0);
                    let n = nr * cols;
                    expand_range(q, *compute, r0 * cols, &mut tmp[..n]);
                    f(r0, &tmp[..n]);
                    r0 += nr;
                }
            }
        }
    }
}

/// The CPU backend in float type `T`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu<T>(pub PhantomData<T>);

impl<T> Cpu<T> {
    pub const fn new() -> Self {
        Cpu(PhantomData)
    }
}

#[inline]
fn silu<T: Real>(x: T) -> T {
    x / (T::one() + (-x).exp())
}

impl<T: Real> Backend for Cpu<T> {
    type Buf = Vec<T>;
    type Weight = CpuWeight<T>;
    type HostBuf = Vec<f32>;
    /// The CPU runs ops as they come; nothing is recorded.
    type Recording = ();
    type Offloaded = Vec<T>;
    /// The gate and up products as they are.
    type MlpActs = (Vec<T>, Vec<T>);
    type AttnActs = [Vec<T>; 3];
    /// The values, copied when the read was asked for (the ops before it have all run).
    type PendingRead = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({})", std::any::type_name::<T>())
    }

    fn zeros(&self, n: usize) -> Vec<T> {
        vec![T::zero(); n]
    }
    fn upload(&self, host: &[f32]) -> Vec<T> {
        host.iter().map(|&x| T::of(x as f64)).collect()
    }
    fn upload_f64(&self, host: &[f64]) -> Vec<T> {
        host.iter().map(|&x| T::of(x)).collect()
    }
    fn download(&self, buf: &Vec<T>) -> Vec<f32> {
        buf.iter().map(|x| x.f64() as f32).collect()
    }
    fn download_f64(&self, buf: &Vec<T>) -> Vec<f64> {
        buf.iter().map(|x| x.f64()).collect()
    }
    fn read_later(&self, buf: &Vec<T>) -> Vec<f32> {
        self.download(buf)
    }
    fn read_wait(&self, pending: Vec<f32>) -> Vec<f32> {
        pending
    }
    fn buf_len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn upload_weight(&self, w: HostWeight) -> CpuWeight<T> {
        match w {
            HostWeight::Dense { rows, cols, data } => {
                CpuWeight::Dense { rows, cols, data: data.iter().map(|&x| T::of(x as f64)).collect() }
            }
            HostWeight::Quant4 { rows, cols, q, compute } => {
                let expanded = Expanded::try_new(&q, compute);
                CpuWeight::Quant4 { rows, cols, q, compute, expanded }
            }
        }
    }
    fn weight_shape(&self, w: &CpuWeight<T>) -> (usize, usize) {
        w.shape()
    }
    fn weight_to_host(&self, w: &CpuWeight<T>) -> HostWeight {
        match w {
            CpuWeight::Dense { rows, cols, data } => {
                HostWeight::Dense { rows: *rows, cols: *cols, data: data.iter().map(|x| x.f64() as f32).collect() }
            }
            CpuWeight::Quant4 { rows, cols, q, compute, .. } => {
                HostWeight::Quant4 { rows: *rows, cols: *cols, q: q.clone(), compute: *compute }
            }
        }
    }
    fn read_range(&self, buf: &Vec<T>, start: usize, len: usize) -> Vec<T> {
        buf[start..start + len].to_vec()
    }
    fn write_range(&self, src: &Vec<T>, dst: &mut Vec<T>, offset: usize) {
        dst[offset..offset + src.len()].copy_from_slice(src);
    }

    fn add_assign(&self, dst: &mut Vec<T>, src: &Vec<T>) {
        assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *d + *s;
        }
    }
    fn add(&self, a: &Vec<T>, b: &Vec<T>, out: &mut Vec<T>) {
        assert!(a.len() == b.len() && a.len() == out.len(), "add: length mismatch");
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = *x + *y;
        }
    }
    fn scale(&self, buf: &mut Vec<T>, s: f64) {
        let s = T::of(s);
        buf.iter_mut().for_each(|x| *x = *x * s);
    }
    fn sum_squares(&self, buf: &Vec<T>) -> f64 {
        buf.iter().map(|x| x.f64() * x.f64()).sum()
    }
    fn has_non_finite(&self, buf: &Vec<T>) -> bool {
        buf.iter().any(|x| !x.is_finite())
    }
    fn add_uniform_noise(&self, buf: &mut Vec<T>, magnitude: f32, seed: u64) {
        for (i, x) in buf.iter_mut().enumerate() {
            // In f32 whatever T is: the noise is f32 on every backend.
            *x = *x + T::of((magnitude * super::uniform_pm1(seed, i as u64)) as f64);
        }
    }

    fn embedding(&self, table: &CpuWeight<T>, ids: &[u32], out: &mut Vec<T>) {
        let (vocab, dim) = table.shape();
        assert_eq!(out.len(), ids.len() * dim, "embedding: out has the wrong length");
        match table {
            CpuWeight::Dense { data, .. } => {
                for (i, &id) in ids.iter().enumerate() {
                    let id = id as usize;
                    assert!(id < vocab, "token id {id} >= vocab {vocab}");
                    out[i * dim..(i + 1) * dim].copy_from_slice(&data[id * dim..(id + 1) * dim]);
                }
            }
            CpuWeight::Quant4 { q, .. } => {
                let mut row = vec![0f32; dim];
                for (i, &id) in ids.iter().enumerate() {
                    let id = id as usize;
                    assert!(id < vocab, "token id {id} >= vocab {vocab}");
                    q.dequantize_range(id * dim, &mut row);
                    for (o, r) in out[i * dim..(i + 1) * dim].iter_mut().zip(&row) {
                        *o = T::of(*r as f64);
                    }
                }
            }
        }
    }
    fn embedding_backward(&self, ids: &[u32], dout: &Vec<T>, dim: usize, dtable: &mut Vec<T>) {
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            for j in 0..dim {
                dtable[id * dim + j] = dtable[id * dim + j] + dout[i * dim + j];
            }
        }
    }

    fn rmsnorm(&self, x: &Vec<T>, w: &Vec<T>, dim: usize, eps: f64, out: &mut Vec<T>, rstd: &mut Vec<T>) {
        let m = x.len() / dim;
        assert!(out.len() == x.len() && rstd.len() == m && w.len() == dim, "rmsnorm: bad shapes");
        for i in 0..m {
            let row = &x[i * dim..(i + 1) * dim];
            let ms = row.iter().map(|v| *v * *v).sum::<T>() / T::of(dim as f64);
            let r = T::one() / (ms + T::of(eps)).sqrt();
            rstd[i] = r;
            for j in 0..dim {
                out[i * dim + j] = row[j] * r * w[j];
            }
        }
    }
    fn rmsnorm_backward(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        rstd: &Vec<T>,
        dout: &Vec<T>,
        dim: usize,
        dx: &mut Vec<T>,
        accumulate: bool,
    ) {
        // y = x·r·w with r = (mean x² + eps)^-1/2  ⇒  dx = r·(g − x·r²·mean(g·x)), g = dy·w.
        let m = x.len() / dim;
        for i in 0..m {
            let r = rstd[i];
            let xs = &x[i * dim..(i + 1) * dim];
            let dys = &dout[i * dim..(i + 1) * dim];
            let dot = (0..dim).map(|j| dys[j] * w[j] * xs[j]).sum::<T>() / T::of(dim as f64);
            for j in 0..dim {
                let d = r * (dys[j] * w[j] - xs[j] * r * r * dot);
                dx[i * dim + j] = if accumulate { dx[i * dim + j] + d } else { d };
            }
        }
    }

    fn linear(&self, x: &Vec<T>, w: &CpuWeight<T>, m: usize, out: &mut Vec<T>) {
        let (rows, cols) = w.shape();
        assert!(x.len() == m * cols && out.len() == m * rows, "linear: bad shapes");
        let compute = w.compute();
        let x = rounded(x, compute);
        let x = x.as_ref();
        if m <= GEMV_MAX_M {
            // Decoding's few rows: a row of W at a time, straight from the codes when 4-bit (expanding
            // every slab of W, or packing it for the GEMM, cost more than the products).
            match w {
                CpuWeight::Quant4 { q, expanded: None, .. } => gemv_quant4(q, (rows, cols), compute, x, m, out),
                CpuWeight::Dense { data, .. } | CpuWeight::Quant4 { expanded: Some(Expanded(data)), .. } => {
                    gemv_rows((rows, cols), x, m, out, |r, xi| dot8(xi, &data[r * cols..][..cols]))
                }
            }
            return round_in_place(out, compute);
        }
        // out[:, r0..r0+nr] = x · slabᵀ, the slab being rows r0.. of W.
        w.for_each_slab(|r0, slab| {
            let nr = slab.len() / cols;
            T::gemm(
                m,
                cols,
                nr,
                T::one(),
                x,
                (cols as isize, 1),
                slab,
                (1, cols as isize),
                T::zero(),
                &mut out[r0..],
                (rows as isize, 1),
            );
        });
        round_in_place(out, compute);
    }
    fn linear_backward_input(&self, dy: &Vec<T>, w: &CpuWeight<T>, m: usize, dx: &mut Vec<T>, accumulate: bool) {
        let (rows, cols) = w.shape();
        assert!(dy.len() == m * rows && dx.len() == m * cols, "linear_backward_input: bad shapes");
        let compute = w.compute();
        let dy = rounded(dy, compute);
        let mut prod = vec![T::zero(); m * cols];
        // prod += dy[:, r0..r0+nr] · slab.
        w.for_each_slab(|r0, slab| {
            let nr = slab.len() / cols;
            T::gemm(
                m,
                nr,
                cols,
                T::one(),
                &dy[r0..],
                (rows as isize, 1),
                slab,
                (cols as isize, 1),
                T::one(),
                &mut prod,
                (cols as isize, 1),
            );
        });
        round_in_place(&mut prod, compute);
        if accumulate {
            dx.iter_mut().zip(&prod).for_each(|(d, p)| *d = *d + *p);
        } else {
            dx.copy_from_slice(&prod);
        }
    }

    fn lora_down(&self, x: &Vec<T>, a: &Vec<T>, m: usize, r: usize, dropout: Dropout, u: &mut Vec<T>) {
        let cols = a.len() / r;
        assert!(x.len() == m * cols && u.len() == m * r, "lora_down: bad shapes");
        let xd = dropped(x, dropout);
        T::gemm(m, cols, r, T::one(), &xd, (cols as isize, 1), a, (1, cols as isize), T::zero(), u, (r as isize, 1));
    }
    fn lora_b_forward(&self, u: &Vec<T>, b: &Vec<T>, m: usize, r: usize, scale: f32, y: &mut Vec<T>) {
        let rows = b.len() / r;
        assert!(u.len() == m * r && y.len() == m * rows, "lora_b_forward: bad shapes");
        T::gemm(
            m,
            r,
            rows,
            T::of(scale as f64),
            u,
            (r as isize, 1),
            b,
            (1, r as isize),
            T::one(),
            y,
            (rows as isize, 1),
        );
    }
    fn lora_backward(
        &self,
        x: &Vec<T>,
        a: &Vec<T>,
        b: &Vec<T>,
        u: &Vec<T>,
        dy: &Vec<T>,
        m: usize,
        r: usize,
        scale: f32,
        dropout: Dropout,
        da: &mut Vec<T>,
        db: &mut Vec<T>,
        dx: &mut Vec<T>,
    ) {
        let cols = a.len() / r;
        let rows = b.len() / r;
        let s = T::of(scale as f64);
        // db (rows, r) += s · dyᵀ · u
        T::gemm(rows, m, r, s, dy, (1, rows as isize), u, (r as isize, 1), T::one(), db, (r as isize, 1));
        // du (m, r) = s · dy · B
        let mut du = vec![T::zero(); m * r];
        T::gemm(m, rows, r, s, dy, (rows as isize, 1), b, (r as isize, 1), T::zero(), &mut du, (r as isize, 1));
        // da (r, cols) += duᵀ · drop(x)
        let xd = dropped(x, dropout);
        T::gemm(r, m, cols, T::one(), &du, (1, r as isize), &xd, (cols as isize, 1), T::one(), da, (cols as isize, 1));
        // dx += drop'(du · A)
        let mut dxd = vec![T::zero(); m * cols];
        T::gemm(
            m,
            r,
            cols,
            T::one(),
            &du,
            (r as isize, 1),
            a,
            (cols as isize, 1),
            T::zero(),
            &mut dxd,
            (cols as isize, 1),
        );
        for (i, (d, g)) in dx.iter_mut().zip(&dxd).enumerate() {
            *d = *d + *g * T::of(dropout.factor(i as u64) as f64);
        }
    }

    fn rope(
        &self,
        x: &Vec<T>,
        cos: &Vec<T>,
        sin: &Vec<T>,
        heads: usize,
        head_dim: usize,
        inverse: bool,
        out: &mut Vec<T>,
    ) {
        let half = head_dim / 2;
        let m = x.len() / (heads * head_dim);
        assert!(cos.len() == m * half && sin.len() == m * half && out.len() == x.len(), "rope: bad shapes");
        for t in 0..m {
            for h in 0..heads {
                let base = (t * heads + h) * head_dim;
                for i in 0..half {
                    let c = cos[t * half + i];
                    let s = if inverse { -sin[t * half + i] } else { sin[t * half + i] };
                    let (x1, x2) = (x[base + i], x[base + half + i]);
                    out[base + i] = x1 * c - x2 * s;
                    out[base + half + i] = x2 * c + x1 * s;
                }
            }
        }
    }

    fn attention(
        &self,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        sh: AttnShape,
        segments: Option<&[u32]>,
        out: &mut Vec<T>,
        lse: &mut Vec<T>,
    ) {
        // One task per (batch row, KV head): its query heads read only that group's keys.
        let groups: Vec<(Vec<T>, Vec<T>)> = (0..sh.batch * sh.kv_heads)
            .into_par_iter()
            .map(|bg| attention_group(q, k, v, sh, segments, bg / sh.kv_heads, bg % sh.kv_heads))
            .collect();
        let (d, rep) = (sh.head_dim, sh.heads / sh.kv_heads);
        for (bg, (o, l)) in groups.into_iter().enumerate() {
            let (b, g) = (bg / sh.kv_heads, bg % sh.kv_heads);
            for t in 0..sh.q_len {
                for r in 0..rep {
                    let h = g * rep + r;
                    let qi = ((b * sh.q_len + t) * sh.heads + h) * d;
                    out[qi..qi + d].copy_from_slice(&o[(t * rep + r) * d..(t * rep + r + 1) * d]);
                    lse[(b * sh.heads + h) * sh.q_len + t] = l[r * sh.q_len + t];
                }
            }
        }
    }
    fn attention_backward(
        &self,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &Vec<T>,
        lse: &Vec<T>,
        dout: &Vec<T>,
        sh: AttnShape,
        segments: Option<&[u32]>,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
    ) {
        let groups: Vec<[Vec<T>; 3]> = (0..sh.batch * sh.kv_heads)
            .into_par_iter()
            .map(|bg| {
                attention_group_backward(q, k, v, out, lse, dout, sh, segments, bg / sh.kv_heads, bg % sh.kv_heads)
            })
            .collect();
        let (d, rep) = (sh.head_dim, sh.heads / sh.kv_heads);
        dq.iter_mut().for_each(|x| *x = T::zero());
        dk.iter_mut().for_each(|x| *x = T::zero());
        dv.iter_mut().for_each(|x| *x = T::zero());
        for (bg, [gq, gk, gv]) in groups.into_iter().enumerate() {
            let (b, g) = (bg / sh.kv_heads, bg % sh.kv_heads);
            for t in 0..sh.q_len {
                for r in 0..rep {
                    let qi = ((b * sh.q_len + t) * sh.heads + g * rep + r) * d;
                    dq[qi..qi + d].copy_from_slice(&gq[(t * rep + r) * d..(t * rep + r + 1) * d]);
                }
            }
            for s in 0..sh.kv_len {
                let ki = ((b * sh.kv_capacity + s) * sh.kv_heads + g) * d;
                dk[ki..ki + d].copy_from_slice(&gk[s * d..(s + 1) * d]);
                dv[ki..ki + d].copy_from_slice(&gv[s * d..(s + 1) * d]);
            }
        }
    }

    fn swiglu(&self, gate: &Vec<T>, up: &Vec<T>, out: &mut Vec<T>) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(*g) * *u;
        }
    }
    fn mlp_gate_up(
        &self,
        x: &Vec<T>,
        gate: &CpuWeight<T>,
        up: &CpuWeight<T>,
        _: &CpuWeight<T>,
        m: usize,
    ) -> Self::MlpActs {
        mlp_gate_up_composed(self, x, gate, up, m)
    }
    fn mlp_acts_len(&self, (g, u): &Self::MlpActs) -> usize {
        g.len() + u.len()
    }
    fn mlp_acts_from_f32(&self, g: Vec<T>, u: Vec<T>) -> Self::MlpActs {
        (g, u)
    }
    fn mlp_swiglu(&self, (g, u): &Self::MlpActs, out: &mut Vec<T>) {
        self.swiglu(g, u, out);
    }
    fn mlp_swiglu_backward(&self, (g, u): &Self::MlpActs, dout: &Vec<T>, dgate: &mut Vec<T>, dup: &mut Vec<T>) {
        self.swiglu_backward(g, u, dout, dgate, dup);
    }
    fn attn_acts(&self, q: Vec<T>, k: Vec<T>, v: Vec<T>, _: RopeTables<'_, Self>, _: AttnShape) -> [Vec<T>; 3] {
        [q, k, v]
    }
    fn attn_acts_len(&self, acts: &[Vec<T>; 3]) -> usize {
        acts.iter().map(Vec::len).sum()
    }
    fn rope_attention_acts(
        &self,
        [q, k, v]: &[Vec<T>; 3],
        rope: RopeTables<'_, Self>,
        shape: AttnShape,
        segments: Option<&[u32]>,
        out: &mut Vec<T>,
        lse: &mut Vec<T>,
    ) {
        self.rope_attention(q, k, v, rope, shape, segments, out, lse);
    }
    fn rope_attention_acts_backward(
        &self,
        [q, k, v]: &[Vec<T>; 3],
        rope: RopeTables<'_, Self>,
        out: &Vec<T>,
        lse: &Vec<T>,
        dout: &Vec<T>,
        shape: AttnShape,
        segments: Option<&[u32]>,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
    ) {
        self.rope_attention_backward(q, k, v, rope, out, lse, dout, shape, segments, dq, dk, dv);
    }
    fn mlp_down(&self, (g, u): &Self::MlpActs, down: &CpuWeight<T>, m: usize, out: &mut Vec<T>, accumulate: bool) {
        mlp_down_composed(self, (g, u), down, m, out, accumulate);
    }
    fn mlp_backward(
        &self,
        dy: &Vec<T>,
        (g, u): &Self::MlpActs,
        gate: &CpuWeight<T>,
        up: &CpuWeight<T>,
        down: &CpuWeight<T>,
        m: usize,
        dx: &mut Vec<T>,
        accumulate: bool,
    ) {
        mlp_backward_composed(self, dy, (g, u), gate, up, down, m, dx, accumulate);
    }
    fn swiglu_backward(&self, gate: &Vec<T>, up: &Vec<T>, dout: &Vec<T>, dgate: &mut Vec<T>, dup: &mut Vec<T>) {
        for i in 0..gate.len() {
            let g = gate[i];
            let sig = T::one() / (T::one() + (-g).exp());
            dup[i] = dout[i] * g * sig;
            // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
            dgate[i] = dout[i] * up[i] * sig * (T::one() + g * (T::one() - sig));
        }
    }

    fn cross_entropy(
        &self,
        logits: &Vec<T>,
        targets: &[i32],
        vocab: usize,
        scale: f32,
        dlogits: &mut Vec<T>,
    ) -> (f64, usize) {
        let m = targets.len();
        assert!(logits.len() == m * vocab && dlogits.len() == logits.len(), "cross_entropy: bad shapes");
        let mut loss = 0f64;
        let mut count = 0usize;
        let s = T::of(scale as f64);
        for i in 0..m {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let drow = &mut dlogits[i * vocab..(i + 1) * vocab];
            let t = targets[i];
            if t < 0 {
                drow.iter_mut().for_each(|x| *x = T::zero());
                continue;
            }
            let t = t as usize;
            assert!(t < vocab, "target {t} >= vocab {vocab}");
            let mx = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
            let sum = row.iter().map(|&x| (x - mx).exp()).sum::<T>();
            let lse = mx + sum.ln();
            loss += (lse - row[t]).f64();
            count += 1;
            // softmax · s as exp(x − max) · (s / sum), the kernels' formula (kernels/xent.cu)
            let p = s / sum;
            for j in 0..vocab {
                drow[j] = (row[j] - mx).exp() * p;
            }
            drow[t] = drow[t] - s;
        }
        (loss, count)
    }

    fn adamw(&self, param: &mut Vec<T>, grad: &Vec<T>, m: &mut Vec<T>, v: &mut Vec<T>, hp: &AdamWStep) {
        // bitsandbytes' 32-bit Adam, in f32 whatever T is so CPU and GPU round alike.
        let (step_size, c2) = hp.corrections();
        for i in 0..param.len() {
            let (p, mi, vi) = adam_value(
                param[i].f64() as f32,
                grad[i].f64() as f32,
                m[i].f64() as f32,
                v[i].f64() as f32,
                hp,
                step_size,
                c2,
            );
            m[i] = T::of(mi as f64);
            v[i] = T::of(vi as f64);
            param[i] = T::of(p as f64);
        }
    }
    fn adamw_paged(
        &self,
        param: &mut Vec<T>,
        grad: &Vec<T>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        hp: &AdamWStep,
        _chunk: usize,
    ) {
        // Host memory is where the CPU keeps everything: the paged update is the plain one.
        let (step_size, c2) = hp.corrections();
        for i in 0..param.len() {
            let (p, mi, vi) = adam_value(param[i].f64() as f32, grad[i].f64() as f32, m[i], v[i], hp, step_size, c2);
            (m[i], v[i], param[i]) = (mi, vi, T::of(p as f64));
        }
    }
    // Host memory is where CPU buffers already are.
    fn offload(&self, buf: Vec<T>) -> Vec<T> {
        buf
    }
    fn reload(&self, parked: Vec<T>) -> Vec<T> {
        parked
    }
    fn restore(&self, parked: Vec<T>) -> Vec<T> {
        parked
    }
    fn host_buf(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn host_to_vec(&self, h: &Vec<f32>) -> Vec<f32> {
        h.clone()
    }
}

/// Rows of x up to which a linear takes a row of W at a time (as CUDA's GEMV: decoding, small prompts):
/// [`gemv_quant4`] from the codes of a 4-bit weight not expanded at upload, dot products otherwise.
const GEMV_MAX_M: usize = 8;

/// Values `start..start + out.len()` of `q` as products use them: dequantized, rounded to the compute
/// dtype and converted to `T`, in one parallel pass (the upload's expansion and the slabs alike).
fn expand_range<T: Real>(q: &Quant4, compute: ComputeDtype, start: usize, out: &mut [T]) {
    q.dequantize_range_map(start, out, |v| T::of(compute.round(v) as f64));
}

/// `out (m, rows) = x (m, cols) · Wᵀ` for a 4-bit `W (rows, cols)` read from its codes: each weight
/// rounded to the compute dtype and multiplied in `T`, as the slab-wise dequantize + GEMM path does,
/// summed in another order. No expanded copy of W exists.
fn gemv_quant4<T: Real>(q: &Quant4, (rows, cols): (usize, usize), c: ComputeDtype, x: &[T], m: usize, out: &mut [T]) {
    let table = crate::quant::code_table(q.quant_type);
    let absmax = q.absmax.values();
    // The 16 codes of each absmax block as T, rounded to the compute dtype: one product per lookup.
    let weight = |block: usize| -> [T; 16] { table.map(|v| T::of(c.round(v * absmax[block]) as f64)) };
    gemv_rows((rows, cols), x, m, out, |row, xi| {
        let mut sum = T::zero();
        let mut j = 0;
        while j < cols {
            // The run of this row's columns in one absmax block.
            let start = row * cols + j;
            let block = start / q.blocksize;
            let end = ((block + 1) * q.blocksize - row * cols).min(cols);
            let w = weight(block);
            let (mut even, mut odd) = (T::zero(), T::zero());
            if start % 2 == 0 && (end - j) % 2 == 0 {
                // Whole bytes: element 2k in the high nibble, 2k + 1 in the low one.
                let bytes = &q.packed[start / 2..(start + end - j) / 2];
                for (pair, &b) in xi[j..end].chunks_exact(2).zip(bytes) {
                    even = even + pair[0] * w[(b >> 4) as usize];
                    odd = odd + pair[1] * w[(b & 15) as usize];
                }
            } else {
                for (col, &xv) in xi.iter().enumerate().take(end).skip(j) {
                    even = even + xv * w[q.code_at(row * cols + col) as usize];
                }
            }
            sum = sum + even + odd;
            j = end;
        }
        sum
    });
}

/// `out (m, rows)` with `out[i][r] = row_dot(r, x_i)` for the `m` rows `x_i` of `x (m, cols)`, output
/// rows split over threads.
fn gemv_rows<T: Real>(
    (rows, cols): (usize, usize),
    x: &[T],
    m: usize,
    out: &mut [T],
    row_dot: impl Fn(usize, &[T]) -> T + Sync,
) {
    const ROWS_PER_TASK: usize = 16;
    // Transposed (rows, m), so that each task owns whole output rows.
    let mut out_t = vec![T::zero(); rows * m];
    out_t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, chunk)| {
        for (k, per_row) in chunk.chunks_mut(m).enumerate() {
            for (i, o) in per_row.iter_mut().enumerate() {
                *o = row_dot(task * ROWS_PER_TASK + k, &x[i * cols..(i + 1) * cols]);
            }
        }
    });
    for (r, per_row) in out_t.chunks(m).enumerate() {
        for (i, &v) in per_row.iter().enumerate() {
            out[i * rows + r] = v;
        }
    }
}

/// `Σ a·b` over eight interleaved partial sums (independent chains the compiler can vectorize).
fn dot8<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ac.remainder().iter().zip(bc.remainder()).map(|(&x, &y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// `x` rounded to `c` (a borrow when `c` is f32).
fn rounded<T: Real>(x: &[T], c: ComputeDtype) -> std::borrow::Cow<'_, [T]> {
    if c == ComputeDtype::F32 {
        return std::borrow::Cow::Borrowed(x);
    }
    std::borrow::Cow::Owned(x.iter().map(|v| T::of(c.round(v.f64() as f32) as f64)).collect())
}

fn round_in_place<T: Real>(x: &mut [T], c: ComputeDtype) {
    if c != ComputeDtype::F32 {
        x.iter_mut().for_each(|v| *v = T::of(c.round(v.f64() as f32) as f64));
    }
}

/// `x` with inverted dropout applied (a copy when dropout is active).
fn dropped<T: Real>(x: &[T], dropout: Dropout) -> std::borrow::Cow<'_, [T]> {
    if !dropout.is_active() {
        return std::borrow::Cow::Borrowed(x);
    }
    std::borrow::Cow::Owned(x.iter().enumerate().map(|(i, &v)| v * T::of(dropout.factor(i as u64) as f64)).collect())
}

/// Forward attention of the query heads sharing KV head `g` in batch row `b`. Returns the outputs
/// `(q_len, rep, head_dim)` and log-sum-exps `(rep, q_len)` of those heads.
fn attention_group<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    sh: AttnShape,
    segments: Option<&[u32]>,
    b: usize,
    g: usize,
) -> (Vec<T>, Vec<T>) {
    let (d, rep) = (sh.head_dim, sh.heads / sh.kv_heads);
    let scale = T::of(1.0 / (d as f64).sqrt());
    let mut out = vec![T::zero(); sh.q_len * rep * d];
    let mut lse = vec![T::zero(); rep * sh.q_len];
    let mut p = vec![T::zero(); sh.kv_len];
    let mut visible = Vec::with_capacity(sh.kv_len);
    for t in 0..sh.q_len {
        visible_keys(sh, segments, b, t, &mut visible);
        for r in 0..rep {
            let qi = ((b * sh.q_len + t) * sh.heads + g * rep + r) * d;
            let qrow = &q[qi..qi + d];
            if visible.is_empty() {
                lse[r * sh.q_len + t] = T::neg_infinity();
                continue;
            }
            let mut mx = T::neg_infinity();
            for &s in &visible {
                let ki = ((b * sh.kv_capacity + s) * sh.kv_heads + g) * d;
                let dot = dot8(qrow, &k[ki..ki + d]) * scale;
                p[s] = dot;
                mx = mx.max(dot);
            }
            let mut denom = T::zero();
            for &s in &visible {
                p[s] = (p[s] - mx).exp();
                denom = denom + p[s];
            }
            let o = &mut out[(t * rep + r) * d..(t * rep + r + 1) * d];
            for &s in &visible {
                let w = p[s] / denom;
                let vi = ((b * sh.kv_capacity + s) * sh.kv_heads + g) * d;
                for (oj, vj) in o.iter_mut().zip(&v[vi..vi + d]) {
                    *oj = *oj + w * *vj;
                }
            }
            lse[r * sh.q_len + t] = mx + denom.ln();
        }
    }
    (out, lse)
}

/// Backward of [`attention_group`]: recompute p = exp(s − lse); dv += pᵀ·do; dp = do·vᵀ;
/// ds = p ⊙ (dp − rowsum(do ⊙ o)). Returns dq `(q_len, rep, d)`, dk and dv `(kv_len, d)`.
#[allow(clippy::too_many_arguments)]
fn attention_group_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    sh: AttnShape,
    segments: Option<&[u32]>,
    b: usize,
    g: usize,
) -> [Vec<T>; 3] {
    let (d, rep) = (sh.head_dim, sh.heads / sh.kv_heads);
    let scale = T::of(1.0 / (d as f64).sqrt());
    let mut dq = vec![T::zero(); sh.q_len * rep * d];
    let mut dk = vec![T::zero(); sh.kv_len * d];
    let mut dv = vec![T::zero(); sh.kv_len * d];
    let mut visible = Vec::with_capacity(sh.kv_len);
    for t in 0..sh.q_len {
        visible_keys(sh, segments, b, t, &mut visible);
        for r in 0..rep {
            let h = g * rep + r;
            let qi = ((b * sh.q_len + t) * sh.heads + h) * d;
            let (qrow, dorow) = (&q[qi..qi + d], &dout[qi..qi + d]);
            let l = lse[(b * sh.heads + h) * sh.q_len + t];
            let delta = dot8(dorow, &out[qi..qi + d]);
            let dqrow = &mut dq[(t * rep + r) * d..(t * rep + r + 1) * d];
            for &s in &visible {
                let ki = ((b * sh.kv_capacity + s) * sh.kv_heads + g) * d;
                let (krow, vrow) = (&k[ki..ki + d], &v[ki..ki + d]);
                let p = (dot8(qrow, krow) * scale - l).exp();
                let ds = p * (dot8(dorow, vrow) - delta) * scale;
                for j in 0..d {
                    dv[s * d + j] = dv[s * d + j] + p * dorow[j];
                    dqrow[j] = dqrow[j] + ds * krow[j];
                    dk[s * d + j] = dk[s * d + j] + ds * qrow[j];
                }
            }
        }
    }
    [dq, dk, dv]
}

/// Keys visible to query `t` of batch row `b`: causal by absolute position, same segment, not padding.
/// (written into `out`).
fn visible_keys(sh: AttnShape, segments: Option<&[u32]>, b: usize, t: usize, out: &mut Vec<usize>) {
    out.clear();
    let pos = sh.q_offset + t;
    let last = pos.min(sh.kv_len.saturating_sub(1));
    match segments {
        None => out.extend(0..=last),
        Some(seg) => {
            let qseg = seg[b * sh.kv_capacity + pos];
            if qseg != 0 {
                out.extend((0..=last).filter(|&s| seg[b * sh.kv_capacity + s] == qseg));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{QuantConfig, QuantType};
    use rand::{Rng, SeedableRng};

    /// A 4-bit weight expanded once at upload gives the products of the slab-by-slab expansion: the
    /// same values in the forward product (each output's sum lies in one GEMM either way) and the GEMV,
    /// the input gradient up to the order of its sum over the rows.
    #[test]
    fn expanded_weights_give_the_slab_products() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let be = Cpu::<f32>::new();
        for (rows, cols, compute) in [(600, 64, ComputeDtype::BF16), (300, 96, ComputeDtype::F32)] {
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let cfg =
                QuantConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true, compute_dtype: compute };
            let q = Quant4::quantize(&data, &cfg);
            let expanded = Expanded::try_new(&q, compute);
            assert!(expanded.is_some(), "a small weight fits the budget");
            let kept = CpuWeight::<f32>::Quant4 { rows, cols, q: q.clone(), compute, expanded };
            let slabs = CpuWeight::<f32>::Quant4 { rows, cols, q, compute, expanded: None };
            for m in [1, 5, 40] {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let dy: Vec<f32> = (0..m * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let (mut y1, mut y2) = (vec![0.0; m * rows], vec![0.0; m * rows]);
                be.linear(&x, &kept, m, &mut y1);
                be.linear(&x, &slabs, m, &mut y2);
                if m > GEMV_MAX_M {
                    assert_eq!(y1, y2, "{rows}x{cols} m={m}: forward");
                } else {
                    // Dot products of the expanded rows against the GEMV from the codes.
                    for (a, b) in y1.iter().zip(&y2) {
                        assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{rows}x{cols} m={m}: {a} vs {b}");
                    }
                }
                let (mut d1, mut d2) = (vec![0.0; m * cols], vec![0.0; m * cols]);
                be.linear_backward_input(&dy, &kept, m, &mut d1, false);
                be.linear_backward_input(&dy, &slabs, m, &mut d2, false);
                for (a, b) in d1.iter().zip(&d2) {
                    assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{rows}x{cols} m={m}: input grad {a} vs {b}");
                }
            }
        }
    }

    /// The 4-bit GEMV of decoding gives the slab-wise dequantize + GEMM path's products (the same
    /// rounded weights, summed in another order), for both code tables, plain and double-quantized
    /// absmax, rounding compute dtypes, and shapes whose rows start inside an absmax block.
    #[test]
    fn gemv_quant4_matches_dequantize_then_gemm() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (rows, cols, blocksize) in [(37, 64, 64), (33, 100, 64), (16, 30, 32), (5, 257, 128)] {
            for quant_type in [QuantType::Nf4, QuantType::Fp4] {
                for (double_quant, compute) in [(false, ComputeDtype::F32), (true, ComputeDtype::F16)] {
                    let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let cfg = QuantConfig { quant_type, blocksize, double_quant, compute_dtype: compute };
                    let q = Quant4::quantize(&data, &cfg);
                    let w = CpuWeight::<f32>::Quant4 { rows, cols, q: q.clone(), compute, expanded: None };
                    for m in [1, 3] {
                        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                        let mut want = vec![0.0; m * rows];
                        w.for_each_slab(|r0, slab| {
                            let nr = slab.len() / cols;
                            for i in 0..m {
                                for r in 0..nr {
                                    let dot: f64 =
                                        (0..cols).map(|j| x[i * cols + j] as f64 * slab[r * cols + j] as f64).sum();
                                    want[i * rows + r0 + r] = dot as f32;
                                }
                            }
                        });
                        let mut got = vec![f32::NAN; m * rows];
                        gemv_quant4(&q, (rows, cols), compute, &x, m, &mut got);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{rows}x{cols}/{blocksize} m={m}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Few rows of x through a dense weight (the LM head in decoding) give the GEMM's values.
    #[test]
    fn dense_linear_of_few_rows_matches_a_plain_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let be = Cpu::<f32>::new();
        for (rows, cols, m) in [(45, 37, 1), (300, 64, 3), (7, 8, 8), (16, 9, 9)] {
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let w = CpuWeight::<f32>::Dense { rows, cols, data: data.clone() };
            let mut got = vec![f32::NAN; m * rows];
            be.linear(&x, &w, m, &mut got);
            for i in 0..m {
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|j| x[i * cols + j] as f64 * data[r * cols + j] as f64).sum();
                    let g = got[i * rows + r] as f64;
                    assert!((g - want).abs() <= 1e-5 * (1.0 + want.abs()), "{rows}x{cols} m={m}: {g} vs {want}");
                }
            }
        }
    }
}
