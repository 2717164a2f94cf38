//! Decoding's CUDA graph (`Backend::record` / `replay`): the one-token step captured once and
//! replayed per token, with programmatic dependent launch (PDL) between our kernels.
//!
//! Why PDL: a token is ~320 small kernels, and in a plain graph each starts only after the one
//! before it has finished and drained, so every kernel pays its launch and its ramp-up (blocks
//! placed, first loads in flight) with the GPU partly idle. An edge made programmatic lets the next
//! kernel launch before the previous one's completion is signalled ([`Pdl`]); each of our kernels
//! calls `grid_dependency_wait()` (kernels/common.cuh) before it touches data an earlier kernel
//! wrote or reads, and the GEMVs issue their first weight loads before that wait; decoding's
//! kernels call `allow_dependent_launch()` right after that wait, so the next kernel's blocks are
//! placed and issue those weight loads while this one runs.
//! tests/kernel_sources.rs checks that every kernel waits. Edges to or from anything else (cuBLAS,
//! copies, memsets) stay full dependencies. The driver edits no edge of a graph that holds
//! allocation or free nodes, so the recorded step allocates nothing (`tape::BufPool`,
//! `Cuda::convert_small`).

use super::Cuda;
use cudarc::driver::sys::{
    self, CUgraph, CUgraphEdgeData, CUgraphExec, CUgraphNode, CUgraphNodeType, CUstreamCaptureMode,
    CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER, CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC,
};
use cudarc::driver::{CudaStream, DriverError};
use std::collections::HashSet;
use std::ptr::null_mut;
use std::sync::Arc;

/// When a kernel that follows another of ours in the graph may start (`LLAMATUNE_PDL`).
/// Measured on the H200 (2026-11-29, 7B decode, alternating in one run): off 352.3 / 357.6
/// tokens/s, at launch 360.2 / 360.0, at exit 362.3 / 363.5, so exit is the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdl {
    /// `0` / `off`: after the previous kernel has finished (a plain graph edge).
    Off,
    /// `exit`, the default: once every block of the previous kernel has triggered
    /// (`allow_dependent_launch`, kernels/common.cuh: decoding's kernels call it right after their
    /// grid wait) or exited, before its completion is signalled and its memory flushed. Triggers
    /// after each kernel's last large load gave +6.9% decoding against exit alone, right after the
    /// wait +1.9% more (H200, session 36, four alternating rounds each).
    AtExit,
    /// `launch`: once every block of the previous kernel has started, so the next kernel's blocks
    /// are placed and issue their weight loads while it runs (they then hold SM slots waiting).
    AtLaunch,
}

impl Pdl {
    pub(super) fn from_env() -> Pdl {
        match std::env::var("LLAMATUNE_PDL").as_deref() {
            Ok("0" | "off") => Pdl::Off,
            Ok("launch") => Pdl::AtLaunch,
            _ => Pdl::AtExit,
        }
    }
}

/// Programmatic launches need compute capability 9.0 (`griddepcontrol`, kernels/common.cuh) and a
/// driver of CUDA 12.3 or later (graph edge data: `cuGraphGetEdges_v2` and its siblings, which
/// cudarc would panic on where the driver lacks them).
pub(super) fn pdl_supported(compute_capability: (i32, i32)) -> bool {
    let mut version = 0;
    // SAFETY: writes one int.
    let driver = unsafe { sys::cuDriverGetVersion(&mut version) }.result().is_ok();
    compute_capability.0 >= 9 && driver && version >= 12030
}

/// A captured and instantiated step.
pub struct StepGraph {
    graph: CUgraph,
    exec: CUgraphExec,
    stream: Arc<CudaStream>,
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: both handles were created by `Cuda::capture_step` and are destroyed once, here.
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
            let _ = sys::cuGraphDestroy(self.graph);
        }
    }
}

impl Cuda {
    /// How graphs captured from now on let one of our kernels start after another (A/B runs and
    /// tests; where `pdl_supported` says no, this stays [`Pdl::Off`]).
    pub fn set_pdl(&self, pdl: Pdl) {
        let supported = self.ctx.compute_capability().is_ok_and(pdl_supported);
        *self.pdl.lock().unwrap() = if supported { pdl } else { Pdl::Off };
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.ctx.compute_capability().unwrap_or((0, 0))
    }

    pub fn pdl(&self) -> Pdl {
        *self.pdl.lock().unwrap()
    }

    /// Of the last graph captured: how many edges were made programmatic, and how many edges join
    /// two of our kernels.
    pub fn last_graph_edges(&self) -> (usize, usize) {
        *self.graph_edges.lock().unwrap()
    }

    /// Captures the ops `f` issues on our stream and instantiates them as a graph, its edges between
    /// our kernels made programmatic per `self.pdl`; `None` (a warning printed; the caller then runs
    /// the step op by op) where the driver cannot capture or instantiate it.
    pub(super) fn capture_step(&self, f: &mut dyn FnMut()) -> Option<StepGraph> {
        let fallback = |what: &str, e: DriverError| {
            eprintln!("warning: {what} failed ({e:?}); decoding without CUDA graphs");
            None
        };
        if let Err(e) = self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
            return fallback("CUDA graph capture", e);
        }
        f();
        let mut graph: CUgraph = null_mut();
        // SAFETY: our stream is capturing (begun above); `graph` receives the captured graph.
        if let Err(e) = unsafe { sys::cuStreamEndCapture(self.stream.cu_stream(), &mut graph).result() } {
            return fallback("CUDA graph capture", e);
        }
        if graph.is_null() {
            return None;
        }
        let pdl = self.pdl();
        let (mut programmatic_edges, mut kernel_edges) = (0, 0);
        if pdl != Pdl::Off {
            let ours: HashSet<usize> = self.funcs.values().map(|f| f.cu_function() as usize).collect();
            // SAFETY: `graph` is the live graph captured above, not yet instantiated.
            match unsafe { make_programmatic(graph, &ours, pdl) } {
                Ok((made, of, refused)) => {
                    (programmatic_edges, kernel_edges) = (made, of);
                    if let Some(why) = refused {
                        eprintln!("warning: {} of {of} kernel edges left plain: {why}", of - made);
                    }
                }
                Err(e) => eprintln!("warning: programmatic launch between kernels unavailable ({e:?})"),
            }
        }
        if let Some(path) = std::env::var_os("LLAMATUNE_GRAPH_DOT") {
            // The captured graph as Graphviz, for looking at what a step launches (debugging; session
            // 15 found its 551 allocation nodes so).
            let path = std::ffi::CString::new(path.to_string_lossy().as_bytes()).unwrap_or_default();
            // SAFETY: `graph` is live; `path` is a NUL-terminated string; flag 1: every node's details.
            let _ = unsafe { sys::cuGraphDebugDotPrint(graph, path.as_ptr(), 1) };
        }
        let mut exec: CUgraphExec = null_mut();
        // SAFETY: `graph` is live; `exec` receives its instantiation.
        let made = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0).result() };
        if let Err(e) = made {
            // SAFETY: `graph` is live and dropped here only.
            unsafe { sys::cuGraphDestroy(graph) };
            return fallback("CUDA graph instantiation", e);
        }
        *self.graph_edges.lock().unwrap() = (programmatic_edges, kernel_edges);
        Some(StepGraph { graph, exec, stream: self.stream.clone() })
    }

    pub(super) fn launch_step(&self, g: &StepGraph) -> Result<(), DriverError> {
        // SAFETY: `g.exec` is a live instantiated graph of this context; our stream is live.
        unsafe { sys::cuGraphLaunch(g.exec, self.stream.cu_stream()).result() }
    }
}

/// The kernel a node launches, if it is a kernel node.
unsafe fn kernel_of(node: CUgraphNode) -> Result<Option<usize>, DriverError> {
    let mut kind = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    sys::cuGraphNodeGetType(node, &mut kind).result()?;
    if kind != CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
        return Ok(None);
    }
    let mut params: sys::CUDA_KERNEL_NODE_PARAMS_v2 = std::mem::zeroed();
    sys::cuGraphKernelNodeGetParams_v2(node, &mut params).result()?;
    Ok(Some(params.func as usize))
}

/// Replaces each plain edge from one of our kernels to another (`ours`: their function handles) by
/// a programmatic edge leaving from `pdl`'s port, where the driver takes it (an edge it refuses keeps
/// its plain form); returns how many it replaced, how many such edges there are, and the first
/// refusal.
unsafe fn make_programmatic(
    graph: CUgraph,
    ours: &HashSet<usize>,
    pdl: Pdl,
) -> Result<(usize, usize, Option<String>), DriverError> {
    let mut n = 0usize;
    sys::cuGraphGetEdges_v2(graph, null_mut(), null_mut(), null_mut(), &mut n).result()?;
    let (mut from, mut to) = (vec![null_mut(); n], vec![null_mut(); n]);
    let mut data: Vec<CUgraphEdgeData> = vec![std::mem::zeroed(); n];
    sys::cuGraphGetEdges_v2(graph, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut n).result()?;
    let port = match pdl {
        Pdl::AtExit => CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC,
        _ => CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER,
    } as u8;
    let programmatic = CUgraphEdgeData {
        from_port: port,
        to_port: 0,
        type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
        reserved: [0; 5],
    };
    // A node whose parameters cannot be read (another library's kernel) is not ours.
    let is_ours = |node| kernel_of(node).ok().flatten().is_some_and(|f| ours.contains(&f));
    let (mut made, mut of, mut refused) = (0, 0, None);
    for i in 0..n {
        let plain = data[i].type_ == 0 && data[i].from_port == 0;
        if !plain || !is_ours(from[i]) || !is_ours(to[i]) {
            continue;
        }
        of += 1;
        if let Err(e) = sys::cuGraphRemoveDependencies_v2(graph, &from[i], &to[i], &data[i], 1).result() {
            refused.get_or_insert(format!("removing edge {i} of {n}: {e:?}"));
            continue;
        }
        match sys::cuGraphAddDependencies_v2(graph, &from[i], &to[i], &programmatic, 1).result() {
            Ok(()) => made += 1,
            Err(e) => {
                refused.get_or_insert(format!("adding edge {i} of {n} as programmatic: {e:?}"));
                // The plain edge back, so that the graph keeps every dependency.
                sys::cuGraphAddDependencies_v2(graph, &from[i], &to[i], &data[i], 1).result()?;
            }
        }
    }
    Ok((made, of, refused))
}
