//! Streams, events, modules, kernel launches of every kind, and graphs.

#[macro_use]
mod support;

use std::ffi::c_uint;

use support::*;

fn null<T>() -> *mut T {
    std::ptr::null_mut()
}

#[test]
fn streams_and_events() {
    scenario("streams_and_events", |cuda| {
        cuda.init_device(0);
        let mut stream = std::ptr::null_mut();
        ok!((cuda.cuStreamCreate)(&mut stream, CU_STREAM_NON_BLOCKING));
        ok!((cuda.cuStreamQuery)(stream));
        ok!((cuda.cuStreamSynchronize)(stream));
        for special in [0usize, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD] {
            ok!((cuda.cuStreamSynchronize)(special as CUstream));
        }
        assert_eq!(
            rc!((cuda.cuStreamCreate)(&mut stream, 4)),
            CUDA_ERROR_INVALID_VALUE
        );
        let mut prioritized = std::ptr::null_mut();
        ok!((cuda.cuStreamCreateWithPriority)(&mut prioritized, 0, -1));

        let (mut start, mut end, mut untimed) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        ok!((cuda.cuEventCreate)(&mut start, CU_EVENT_DEFAULT));
        ok!((cuda.cuEventCreate)(&mut end, CU_EVENT_BLOCKING_SYNC));
        ok!((cuda.cuEventCreate)(&mut untimed, CU_EVENT_DISABLE_TIMING));
        let mut ms = -1.0f32;
        assert_eq!(
            rc!((cuda.cuEventElapsedTime)(&mut ms, start, end)),
            CUDA_ERROR_INVALID_HANDLE,
            "not recorded yet"
        );
        ok!((cuda.cuEventQuery)(start));
        ok!((cuda.cuEventRecord)(start, stream));
        ok!((cuda.cuEventRecord)(end, std::ptr::null_mut()));
        ok!((cuda.cuEventSynchronize)(end));
        ok!((cuda.cuEventElapsedTime)(&mut ms, start, end));
        assert!(ms >= 0.0, "{ms}");
        ok!((cuda.cuEventRecord)(untimed, stream));
        assert_eq!(
            rc!((cuda.cuEventElapsedTime)(&mut ms, start, untimed)),
            CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(
            rc!((cuda.cuEventCreate)(&mut untimed, CU_EVENT_INTERPROCESS)),
            CUDA_ERROR_INVALID_VALUE,
            "interprocess needs no timing"
        );
        assert_eq!(
            rc!((cuda.cuEventRecord)(start, 0x77 as CUstream)),
            CUDA_ERROR_INVALID_HANDLE
        );

        ok!((cuda.cuEventDestroy_v2)(start));
        assert_eq!(rc!((cuda.cuEventQuery)(start)), CUDA_ERROR_INVALID_HANDLE);
        assert_eq!(
            rc!((cuda.cuEventRecord)(stream as CUevent, stream)),
            CUDA_ERROR_INVALID_HANDLE,
            "a stream is not an event"
        );
        ok!((cuda.cuStreamDestroy_v2)(stream));
        assert_eq!(
            rc!((cuda.cuStreamDestroy_v2)(stream)),
            CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(rc!((cuda.cuStreamQuery)(stream)), CUDA_ERROR_INVALID_HANDLE);
        assert_eq!(
            rc!((cuda.cuStreamDestroy_v2)(std::ptr::null_mut())),
            CUDA_ERROR_INVALID_HANDLE
        );
    });
}

#[test]
fn a_destroyed_context_takes_its_streams_and_modules() {
    scenario(
        "a_destroyed_context_takes_its_streams_and_modules",
        |cuda| {
            ok!((cuda.cuInit)(0));
            let mut ctx = std::ptr::null_mut();
            ok!((cuda.cuCtxCreate_v2)(&mut ctx, 0, 0));
            let mut stream = std::ptr::null_mut();
            ok!((cuda.cuStreamCreate)(&mut stream, 0));
            let f = cuda.kernel();
            assert_eq!(cuda.launch(f, 1, 1), CUDA_SUCCESS);
            ok!((cuda.cuCtxDestroy_v2)(ctx));
            cuda.init_device(0);
            assert_eq!(rc!((cuda.cuStreamQuery)(stream)), CUDA_ERROR_INVALID_HANDLE);
            assert_eq!(cuda.launch(f, 1, 1), CUDA_ERROR_INVALID_HANDLE);
        },
    );
}

#[test]
fn launches_are_validated_and_counted() {
    scenario("launches_are_validated_and_counted", |cuda| {
        ok!((cuda.cuInit)(0));
        assert_eq!(rc!((cuda.fakegpu_launch_count)()), 0);
        cuda.init_device(0);
        let f = cuda.kernel();
        let mut again = std::ptr::null_mut();
        let mut module = std::ptr::null_mut();
        ok!((cuda.cuModuleLoadData)(&mut module, c"x".as_ptr().cast()));
        ok!((cuda.cuModuleGetFunction)(
            &mut again,
            module,
            c"kernel".as_ptr()
        ));
        let mut same = std::ptr::null_mut();
        ok!((cuda.cuModuleGetFunction)(
            &mut same,
            module,
            c"kernel".as_ptr()
        ));
        assert_eq!(again, same, "one handle per name and module");

        for _ in 0..5 {
            assert_eq!(cuda.launch(f, 128, 256), CUDA_SUCCESS);
        }
        ok!((cuda.cuLaunchKernel_ptsz)(
            f,
            1,
            2,
            3,
            4,
            5,
            6,
            0,
            CU_STREAM_PER_THREAD as CUstream,
            null(),
            null()
        ));
        assert_eq!(rc!((cuda.fakegpu_launch_count)()), 6);

        assert_eq!(
            cuda.launch(std::ptr::null_mut(), 1, 1),
            CUDA_ERROR_INVALID_VALUE,
            "null function"
        );
        assert_eq!(cuda.launch(f, 0, 1), CUDA_ERROR_INVALID_VALUE, "empty grid");
        assert_eq!(
            cuda.launch(f, 1, 0),
            CUDA_ERROR_INVALID_VALUE,
            "empty block"
        );
        assert_eq!(
            cuda.launch(f, 1, 2048),
            CUDA_ERROR_INVALID_VALUE,
            "more than 1024 threads"
        );
        assert_eq!(
            rc!((cuda.cuLaunchKernel)(
                f,
                1,
                65536,
                1,
                1,
                1,
                1,
                0,
                null(),
                null(),
                null()
            )),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            cuda.launch(0x5005 as CUfunction, 1, 1),
            CUDA_ERROR_INVALID_HANDLE,
            "not a function"
        );
        assert_eq!(
            rc!((cuda.cuLaunchKernel)(
                f,
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                0x1234 as CUstream,
                null(),
                null()
            )),
            CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(
            rc!((cuda.fakegpu_launch_count)()),
            6,
            "refused launches are not counted"
        );

        ok!((cuda.cuModuleUnload)(module));
        assert_eq!(
            cuda.launch(again, 1, 1),
            CUDA_ERROR_INVALID_HANDLE,
            "unloaded with its module"
        );
        assert_eq!(
            rc!((cuda.cuModuleUnload)(module)),
            CUDA_ERROR_INVALID_HANDLE
        );

        ok!((cuda.cuCtxSetCurrent)(null()));
        assert_eq!(cuda.launch(f, 1, 1), CUDA_ERROR_INVALID_CONTEXT);
    });
}

fn config(grid: u32, block: u32, attrs: &mut [CUlaunchAttribute]) -> CUlaunchConfig {
    CUlaunchConfig {
        grid_dim_x: grid,
        grid_dim_y: 1,
        grid_dim_z: 1,
        block_dim_x: block,
        block_dim_y: 1,
        block_dim_z: 1,
        shared_mem_bytes: 0,
        h_stream: std::ptr::null_mut(),
        attrs: attrs.as_mut_ptr().cast(),
        num_attrs: attrs.len() as c_uint,
    }
}

fn cooperative_attribute() -> CUlaunchAttribute {
    let mut value = [0u8; 64];
    value[..4].copy_from_slice(&1i32.to_ne_bytes());
    CUlaunchAttribute {
        id: CU_LAUNCH_ATTRIBUTE_COOPERATIVE,
        pad: [0; 4],
        value,
    }
}

#[test]
fn launch_ex_and_cooperative_launches() {
    scenario("launch_ex_and_cooperative_launches", |cuda| {
        cuda.init_device(0);
        let f = cuda.kernel();
        let plain = config(64, 128, &mut []);
        ok!((cuda.cuLaunchKernelEx)(&plain, f, null(), null()));
        assert_eq!(
            rc!((cuda.cuLaunchKernelEx)(std::ptr::null(), f, null(), null())),
            CUDA_ERROR_INVALID_VALUE
        );
        let mut broken = plain;
        broken.num_attrs = 1;
        broken.attrs = null();
        assert_eq!(
            rc!((cuda.cuLaunchKernelEx)(&broken, f, null(), null())),
            CUDA_ERROR_INVALID_VALUE
        );

        // 128 SMs × (1536 / 1024) = 128 co-resident blocks of 1024 threads.
        ok!((cuda.cuLaunchCooperativeKernel)(
            f,
            128,
            1,
            1,
            1024,
            1,
            1,
            0,
            null(),
            null()
        ));
        assert_eq!(
            rc!((cuda.cuLaunchCooperativeKernel)(
                f,
                129,
                1,
                1,
                1024,
                1,
                1,
                0,
                null(),
                null()
            )),
            CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
        );
        let mut attrs = [cooperative_attribute()];
        let cooperative = config(129, 1024, &mut attrs);
        assert_eq!(
            rc!((cuda.cuLaunchKernelEx)(&cooperative, f, null(), null())),
            CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
        );
        let fits = config(256, 512, &mut attrs);
        ok!((cuda.cuLaunchKernelEx)(&fits, f, null(), null()));

        assert_eq!(rc!((cuda.fakegpu_launch_count)()), 3);
        assert_eq!(rc!((cuda.fakegpu_cooperative_launch_count)()), 2);
    });
}

fn kernel_node(f: CUfunction, grid: u32) -> CUDA_KERNEL_NODE_PARAMS {
    CUDA_KERNEL_NODE_PARAMS {
        func: f,
        grid_dim_x: grid,
        grid_dim_y: 1,
        grid_dim_z: 1,
        block_dim_x: 32,
        block_dim_y: 1,
        block_dim_z: 1,
        shared_mem_bytes: 0,
        kernel_params: std::ptr::null_mut(),
        extra: std::ptr::null_mut(),
    }
}

#[test]
fn graphs_launch_their_kernel_nodes() {
    scenario("graphs_launch_their_kernel_nodes", |cuda| {
        cuda.init_device(0);
        let f = cuda.kernel();
        let mut graph = std::ptr::null_mut();
        ok!((cuda.cuGraphCreate)(&mut graph, 0));
        let (mut first, mut second, mut third) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        ok!((cuda.cuGraphAddKernelNode)(
            &mut first,
            graph,
            std::ptr::null(),
            0,
            &kernel_node(f, 4)
        ));
        ok!((cuda.cuGraphAddKernelNode)(
            &mut second,
            graph,
            &first,
            1,
            &kernel_node(f, 8)
        ));
        let v2 = CUDA_KERNEL_NODE_PARAMS_v2 {
            func: std::ptr::null_mut(),
            grid_dim_x: 1,
            grid_dim_y: 1,
            grid_dim_z: 1,
            block_dim_x: 1,
            block_dim_y: 1,
            block_dim_z: 1,
            shared_mem_bytes: 0,
            kernel_params: std::ptr::null_mut(),
            extra: std::ptr::null_mut(),
            kern: 0xbeef as *mut std::ffi::c_void,
            ctx: std::ptr::null_mut(),
        };
        let deps = [first, second];
        ok!((cuda.cuGraphAddKernelNode_v2)(
            &mut third,
            graph,
            deps.as_ptr(),
            2,
            &v2
        ));

        let mut node = std::ptr::null_mut();
        assert_eq!(
            rc!((cuda.cuGraphAddKernelNode)(
                &mut node,
                graph,
                std::ptr::null(),
                0,
                &kernel_node(std::ptr::null_mut(), 1)
            )),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            rc!((cuda.cuGraphAddKernelNode)(
                &mut node,
                graph,
                std::ptr::null(),
                0,
                &kernel_node(f, 0)
            )),
            CUDA_ERROR_INVALID_VALUE
        );
        let stranger = 0x0009_0000_0000_0001usize as CUgraphNode;
        assert_eq!(
            rc!((cuda.cuGraphAddKernelNode)(
                &mut node,
                graph,
                &stranger,
                1,
                &kernel_node(f, 1)
            )),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            rc!((cuda.cuGraphAddKernelNode)(
                &mut node,
                graph,
                std::ptr::null(),
                1,
                &kernel_node(f, 1)
            )),
            CUDA_ERROR_INVALID_VALUE
        );

        let (mut exec, mut exec_v1) = (std::ptr::null_mut(), std::ptr::null_mut());
        ok!((cuda.cuGraphInstantiateWithFlags)(&mut exec, graph, 0));
        ok!((cuda.cuGraphInstantiate)(
            &mut exec_v1,
            graph,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0
        ));
        ok!((cuda.cuGraphLaunch)(exec, std::ptr::null_mut()));
        ok!((cuda.cuGraphLaunch)(exec_v1, CU_STREAM_LEGACY as CUstream));
        assert_eq!(rc!((cuda.fakegpu_graph_launch_count)()), 2);
        assert_eq!(
            rc!((cuda.fakegpu_launch_count)()),
            6,
            "three kernel nodes per graph launch"
        );
        assert_eq!(
            rc!((cuda.cuGraphLaunch)(
                std::ptr::null_mut(),
                std::ptr::null_mut()
            )),
            CUDA_ERROR_INVALID_VALUE
        );

        ok!((cuda.cuGraphExecDestroy)(exec));
        assert_eq!(
            rc!((cuda.cuGraphLaunch)(exec, std::ptr::null_mut())),
            CUDA_ERROR_INVALID_HANDLE
        );
        ok!((cuda.cuGraphDestroy)(graph));
        ok!((cuda.cuGraphLaunch)(exec_v1, std::ptr::null_mut()));
        assert_eq!(
            rc!((cuda.cuGraphInstantiateWithFlags)(&mut exec, graph, 0)),
            CUDA_ERROR_INVALID_VALUE
        );
    });
}

#[test]
fn threads_launch_at_once() {
    scenario("threads_launch_at_once", |cuda| {
        let ctx = cuda.init_device(0) as usize;
        let f = cuda.kernel() as usize;
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(move || {
                    ok!((cuda.cuCtxSetCurrent)(ctx as CUcontext));
                    for _ in 0..10_000 {
                        assert_eq!(cuda.launch(f as CUfunction, 1, 32), CUDA_SUCCESS);
                    }
                });
            }
        });
        assert_eq!(rc!((cuda.fakegpu_launch_count)()), 80_000);
    });
}

#[test]
fn kernels_take_virtual_time_on_the_sms() {
    scenario("kernels_take_virtual_time_on_the_sms", |cuda| {
        cuda.init_device(0);
        let f = cuda.kernel();
        let clock = || unsafe { (cuda.fakegpu_clock_ns)() };
        let t0 = clock();
        let (mut start, mut end) = (null(), null());
        ok!((cuda.cuEventCreate)(&mut start, CU_EVENT_DEFAULT));
        ok!((cuda.cuEventCreate)(&mut end, CU_EVENT_DEFAULT));
        ok!((cuda.cuEventRecord)(start, null()));
        // 7,680 blocks of 256 threads: 6 resident per SM × 128 SMs = 768 a wave; 10 waves of
        // 100 µs.
        assert_eq!(cuda.launch(f, 7680, 256), CUDA_SUCCESS);
        ok!((cuda.cuEventRecord)(end, null()));
        assert_eq!(clock(), t0, "launching takes no virtual time");
        let mut ms = 0.0f32;
        ok!((cuda.cuEventElapsedTime)(&mut ms, start, end));
        assert!((ms - 1.0).abs() < 1e-6, "{ms} ms");
        ok!((cuda.cuStreamSynchronize)(null()));
        assert_eq!(
            clock(),
            t0 + 1_000_000,
            "synchronising waits for the kernel"
        );
        // A partial wave holds the SMs for a whole wave.
        assert_eq!(cuda.launch(f, 1, 32), CUDA_SUCCESS);
        ok!((cuda.cuEventRecord)(end, null()));
        ok!((cuda.cuEventSynchronize)(end));
        assert_eq!(clock(), t0 + 1_100_000);
        assert_eq!(unsafe { (cuda.fakegpu_process_busy_ns)(0) }, 1_100_000);
        assert_eq!(unsafe { (cuda.fakegpu_device_busy_ns)(0) }, 1_100_000);
        assert_eq!(
            unsafe { (cuda.fakegpu_clock_sleep_until_ns)(t0 + 5_000_000) },
            0
        );
        assert_eq!(
            clock(),
            t0 + 5_000_000,
            "sleeping moves the clock, not the GPU"
        );
        assert_eq!(unsafe { (cuda.fakegpu_process_busy_ns)(0) }, 1_100_000);
        unsafe { (cuda.fakegpu_clock_leave)() };
    });
}
