//! The emulated CUDA driver's own checks, through cudarc's driver calls as the engine makes them:
//! launches that break sm_90's limits are refused, queued work runs only when the host waits for
//! it (so a host reading pinned memory too early sees stale data, as it might on a GPU), and CUDA
//! graphs captured from a stream replay what it queued.

use std::ffi::{c_void, CString};

use cudarc::driver::result;
use cudarc::driver::sys::{CUfunction_attribute, CUresult};
use cudarc::driver::CudaContext;
use inception_engine::gpu::{libs, nvrtc};

#[path = "common/tool_groups.rs"]
mod tool_groups;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct ConvParams {
    ptrs: [u64; 5],
    ints: [i32; 16],
}

/// An empty 1x1 convolution (no image, no output channel): the kernel touches no memory.
fn empty_conv() -> ConvParams {
    ConvParams {
        // n h w cin cout kh kw stride pad_top pad_left oh ow ldc c_offset accumulate k_tiles
        ints: [0, 1, 1, 8, 0, 1, 1, 1, 0, 0, 1, 1, 8, 0, 0, 1],
        ..Default::default()
    }
}

#[test]
fn the_emulated_driver_enforces_limits_and_stream_order() {
    let home = std::env::var_os("INCEPTION_CUDA_HOME")
        .or_else(|| tool_groups::venv_cuda_home().map(Into::into));
    if let Some(h) = &home {
        // The only test of this binary: no other thread reads the environment.
        std::env::set_var("INCEPTION_CUDA_HOME", h);
    }
    if !tool_groups::available(
        "the emulated driver test (tests/emu_driver.rs)",
        libs::ensure_nvrtc().map_err(|e| format!("NVRTC not found: {e:#}")),
    ) {
        return;
    }
    std::env::set_var("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    libs::ensure_driver().unwrap();
    let ctx = CudaContext::new(0).unwrap();
    assert!(ctx.name().unwrap().contains("emulated"));
    assert_eq!(ctx.compute_capability().unwrap(), (9, 0));

    let compiled = nvrtc::compile("conv_tc.cu", "sm_90a").unwrap();
    let module =
        unsafe { result::module::load_data(compiled.cubin.as_ptr() as *const c_void) }.unwrap();
    let func =
        |name: &str| unsafe { result::module::get_function(module, CString::new(name).unwrap()) };
    assert!(func("no_such_kernel").is_err());
    let big = func("conv_fprop_tc_128x128").unwrap();
    let small = func("conv_fprop_tc_128x64").unwrap();
    let mut p = empty_conv();
    let launch = |f, threads: u32, smem: u32, p: &mut ConvParams| {
        let mut args = [p as *mut ConvParams as *mut c_void];
        unsafe {
            result::launch_kernel(
                f,
                (1, 1, 1),
                (threads, 1, 1),
                smem,
                std::ptr::null_mut(),
                &mut args,
            )
        }
    };
    // 128x128 tiles need 60 KiB of dynamic shared memory: refused until the function opts in.
    let smem = 3 * (128 * 40 + 128 * 40) * 2;
    let refused = launch(big, 256, smem, &mut p).unwrap_err();
    assert_eq!(refused.0, CUresult::CUDA_ERROR_INVALID_VALUE);
    unsafe {
        result::function::set_function_attribute(
            big,
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
    }
    .unwrap();
    launch(big, 256, smem, &mut p).unwrap();
    // More threads than the kernel's __launch_bounds__(128), and more than a block may have.
    let bounds = launch(small, 256, 0, &mut p).unwrap_err();
    assert_eq!(bounds.0, CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES);
    assert_eq!(
        launch(small, 2048, 0, &mut p).unwrap_err().0,
        CUresult::CUDA_ERROR_INVALID_VALUE
    );

    // Stream order: a memset and a copy into pinned memory are queued, not done, until the host
    // waits; fresh memory reads as NaN (0xFF bytes) until written.
    let stream = ctx.default_stream();
    unsafe {
        let dev = result::malloc_sync(64).unwrap();
        let host = result::malloc_host(64, 0).unwrap() as *mut u8;
        result::memset_d8_async(dev, 7, 64, stream.cu_stream()).unwrap();
        let pinned = std::slice::from_raw_parts_mut(host, 64);
        result::memcpy_dtoh_async(pinned, dev, stream.cu_stream()).unwrap();
        assert!(
            pinned.iter().all(|&b| b == 0xff),
            "the copy ran before the host waited"
        );
        stream.synchronize().unwrap();
        assert!(pinned.iter().all(|&b| b == 7));
        result::free_host(host as *mut c_void).unwrap();
        result::free_sync(dev).unwrap();
    }
    graphs_capture_and_replay(&ctx);
}

/// A stream capture records what the stream queues; each launch of the graph runs it again on the
/// buffers' current contents; a host wait during the capture invalidates it.
fn graphs_capture_and_replay(ctx: &std::sync::Arc<CudaContext>) {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let stream = ctx.new_stream().unwrap();
    let s = stream.cu_stream();
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL;
    unsafe {
        let (a, b) = (
            result::malloc_sync(64).unwrap(),
            result::malloc_sync(64).unwrap(),
        );
        let host = result::malloc_host(64, 0).unwrap() as *mut u8;
        let pinned = std::slice::from_raw_parts_mut(host, 64);
        result::memset_d8_async(a, 1, 64, s).unwrap();
        stream.synchronize().unwrap();
        stream.begin_capture(mode).unwrap();
        result::memcpy_dtod_async(b, a, 64, s).unwrap();
        result::memcpy_dtoh_async(pinned, b, s).unwrap();
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .unwrap();
        stream.synchronize().unwrap();
        assert!(
            pinned.iter().all(|&v| v == 0xff),
            "captured work ran at capture"
        );
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        assert!(pinned.iter().all(|&v| v == 1));
        result::memset_d8_async(a, 5, 64, s).unwrap();
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        assert!(
            pinned.iter().all(|&v| v == 5),
            "a replay reads the buffers' current contents"
        );
        stream.begin_capture(mode).unwrap();
        assert!(stream.synchronize().is_err());
        match stream.end_capture(CUgraphInstantiate_flags(0)) {
            Err(e) => assert_eq!(e.0, CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
            Ok(_) => panic!("a capture with a host wait in it must be invalidated"),
        }
        drop(graph);
        result::free_host(host as *mut c_void).unwrap();
    }
}
