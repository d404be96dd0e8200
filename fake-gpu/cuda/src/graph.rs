//! CUDA graphs, as far as kernels and memory go: create a graph, add kernel nodes and memory
//! allocation nodes, instantiate, launch. Launching an executable graph counts one graph launch
//! and one kernel per kernel node. A memory allocation node's device memory is taken from the
//! card when the node is added and given back when its graph is destroyed (the real driver
//! maps it at launch and may give it back earlier; the card's accounting is what tests need).

use std::ffi::{c_char, c_uint, c_ulonglong};
use std::sync::Mutex;

use tessera_gpu_abi::cuda::*;

use crate::guard::{Result, check, get, guard, put};
use crate::handles::{Kind, Registry, from_ptr, lock, new_handle, to_ptr};
use crate::launch::Shape;
use crate::memory::AllocKind;
use crate::process::process;
use crate::stream::stream_target;

pub struct Graph {
    /// Node handles in the order added, with each kernel node's shape.
    nodes: Mutex<Vec<(u64, Option<Shape>)>>,
    /// The device memory of its memory allocation nodes.
    allocations: Mutex<Vec<u64>>,
}

pub struct GraphExec {
    /// The shapes of its kernel nodes, run one after another when the graph is launched.
    shapes: Vec<Shape>,
}

pub struct Graphs {
    graphs: Registry<Graph>,
    execs: Registry<GraphExec>,
}

impl Graphs {
    pub fn new() -> Self {
        Self {
            graphs: Registry::new(Kind::Graph),
            execs: Registry::new(Kind::GraphExec),
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphCreate(graph: *mut CUgraph, flags: c_uint) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!graph.is_null() && flags == 0)?;
        let (handle, _) = process.graphs.graphs.insert_with(|_| Graph {
            nodes: Mutex::new(Vec::new()),
            allocations: Mutex::new(Vec::new()),
        });
        unsafe { put(graph, to_ptr(handle)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphDestroy(graph: CUgraph) -> CUresult {
    guard(|| {
        let process = process()?;
        let graph = process
            .graphs
            .graphs
            .remove(from_ptr(graph))
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        for ptr in lock(&graph.allocations).drain(..) {
            let _ = process.memory.free(process, ptr, &[AllocKind::Device]);
        }
        Ok(())
    })
}

/// Adds a kernel node. `kernel_known` says whether the node names a kernel at all (a loaded
/// function, or — v2 only — a library kernel handle the fake cannot check).
fn add_kernel_node(
    node: *mut CUgraphNode,
    graph: CUgraph,
    dependencies: *const CUgraphNode,
    count: usize,
    shape: Shape,
    kernel_known: bool,
) -> Result {
    let process = process()?;
    check(!node.is_null() && kernel_known)?;
    shape.validate()?;
    let graph = process
        .graphs
        .graphs
        .get(from_ptr(graph))
        .ok_or(CUDA_ERROR_INVALID_VALUE)?;
    let handle = add_node(&graph, dependencies, count, Some(shape))?;
    unsafe { put(node, to_ptr(handle)) }
}

/// Appends a node after checking its dependencies are nodes of the graph; returns its handle.
fn add_node(
    graph: &Graph,
    dependencies: *const CUgraphNode,
    count: usize,
    shape: Option<Shape>,
) -> Result<u64> {
    let mut nodes = lock(&graph.nodes);
    if count > 0 {
        check(!dependencies.is_null())?;
        // SAFETY: the caller passes `count` node handles.
        let deps = unsafe { std::slice::from_raw_parts(dependencies, count) };
        check(
            deps.iter()
                .all(|d| nodes.iter().any(|(n, _)| *n == from_ptr(*d))),
        )?;
    }
    let handle = new_handle(Kind::GraphNode);
    nodes.push((handle, shape));
    Ok(handle)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddMemAllocNode(
    node: *mut CUgraphNode,
    graph: CUgraph,
    dependencies: *const CUgraphNode,
    count: usize,
    params: *mut CUDA_MEM_ALLOC_NODE_PARAMS,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!node.is_null() && !params.is_null())?;
        // SAFETY: non-null, per the driver's contract a valid CUDA_MEM_ALLOC_NODE_PARAMS.
        let p = unsafe { &mut *params };
        check(p.bytesize > 0)?;
        check(p.pool_props.location.type_ == CU_MEM_LOCATION_TYPE_DEVICE)?;
        let physical = process.gpu(p.pool_props.location.id)?.physical;
        let graph = process
            .graphs
            .graphs
            .get(from_ptr(graph))
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        let ptr =
            process
                .memory
                .allocate(process, AllocKind::Device, p.bytesize as u64, physical, 0)?;
        let handle = match add_node(&graph, dependencies, count, None) {
            Ok(handle) => handle,
            Err(e) => {
                let _ = process.memory.free(process, ptr, &[AllocKind::Device]);
                return Err(e);
            }
        };
        lock(&graph.allocations).push(ptr);
        p.dptr = ptr;
        unsafe { put(node, to_ptr(handle)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddKernelNode(
    node: *mut CUgraphNode,
    graph: CUgraph,
    dependencies: *const CUgraphNode,
    count: usize,
    params: *const CUDA_KERNEL_NODE_PARAMS,
) -> CUresult {
    guard(|| {
        let process = process()?;
        let p = unsafe { get(params) }?;
        let shape = Shape {
            grid: [p.grid_dim_x, p.grid_dim_y, p.grid_dim_z],
            block: [p.block_dim_x, p.block_dim_y, p.block_dim_z],
        };
        let known = !p.func.is_null() && process.modules.is_function(p.func);
        add_kernel_node(node, graph, dependencies, count, shape, known)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddKernelNode_v2(
    node: *mut CUgraphNode,
    graph: CUgraph,
    dependencies: *const CUgraphNode,
    count: usize,
    params: *const CUDA_KERNEL_NODE_PARAMS_v2,
) -> CUresult {
    guard(|| {
        let process = process()?;
        let p = unsafe { get(params) }?;
        let shape = Shape {
            grid: [p.grid_dim_x, p.grid_dim_y, p.grid_dim_z],
            block: [p.block_dim_x, p.block_dim_y, p.block_dim_z],
        };
        let known = if p.func.is_null() {
            !p.kern.is_null()
        } else {
            process.modules.is_function(p.func)
        };
        add_kernel_node(node, graph, dependencies, count, shape, known)
    })
}

fn instantiate(exec: *mut CUgraphExec, graph: CUgraph) -> Result {
    let process = process()?;
    check(!exec.is_null())?;
    let graph = process
        .graphs
        .graphs
        .get(from_ptr(graph))
        .ok_or(CUDA_ERROR_INVALID_VALUE)?;
    let shapes = lock(&graph.nodes)
        .iter()
        .filter_map(|(_, shape)| *shape)
        .collect();
    let (handle, _) = process.graphs.execs.insert_with(|_| GraphExec { shapes });
    unsafe { put(exec, to_ptr(handle)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiate(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    _error_node: *mut CUgraphNode,
    _log: *mut c_char,
    _log_size: usize,
) -> CUresult {
    guard(|| instantiate(exec, graph))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiate_v2(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    _error_node: *mut CUgraphNode,
    _log: *mut c_char,
    _log_size: usize,
) -> CUresult {
    guard(|| instantiate(exec, graph))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    _flags: c_ulonglong,
) -> CUresult {
    guard(|| instantiate(exec, graph))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: CUgraphExec) -> CUresult {
    guard(|| {
        let process = process()?;
        process
            .graphs
            .execs
            .remove(from_ptr(exec))
            .map(drop)
            .ok_or(CUDA_ERROR_INVALID_VALUE)
    })
}

fn graph_launch(exec: CUgraphExec, stream: CUstream) -> Result {
    let process = process()?;
    check(!exec.is_null())?;
    let exec = process
        .graphs
        .execs
        .get(from_ptr(exec))
        .ok_or(CUDA_ERROR_INVALID_HANDLE)?;
    let ctx = stream_target(process, stream)?;
    process.launches.graphs.add(1);
    process.launches.kernels.add(exec.shapes.len() as u64);
    let spec = &process.gpus[ctx.device].spec;
    let duration = exec
        .shapes
        .iter()
        .map(|shape| crate::clock::kernel_ns(spec, shape))
        .sum();
    crate::clock::run(process, ctx.device, duration);
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphLaunch(exec: CUgraphExec, stream: CUstream) -> CUresult {
    guard(|| graph_launch(exec, stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(exec: CUgraphExec, stream: CUstream) -> CUresult {
    guard(|| graph_launch(exec, stream))
}
