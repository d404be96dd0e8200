//! Every kind of memory and its accounting: device, pitched, managed, page-locked host, async
//! and pool allocations, VMM, arrays. Device 0 is a 4 GiB card, device 1 a 1 GiB card.

#[macro_use]
mod support;

use std::ffi::{c_int, c_void};

use support::*;

#[test]
fn device_memory_is_host_memory() {
    scenario("device_memory_is_host_memory", |cuda| {
        cuda.init_device(0);
        let ptr = cuda.alloc(MIB).unwrap();
        assert_eq!(ptr % 256, 0, "CUDA's minimum alignment");
        let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
        ok!((cuda.cuMemcpyHtoD_v2)(
            ptr,
            data.as_ptr().cast(),
            data.len()
        ));
        let copy = cuda.alloc(MIB).unwrap();
        ok!((cuda.cuMemcpyDtoD_v2)(copy, ptr, data.len()));
        ok!((cuda.cuMemsetD8_v2)(copy, 0xab, 16));
        let mut back = vec![0u8; data.len()];
        ok!((cuda.cuMemcpyDtoH_v2)(
            back.as_mut_ptr().cast(),
            copy,
            back.len()
        ));
        assert_eq!(&back[..16], &[0xab; 16]);
        assert_eq!(&back[16..], &data[16..]);
        ok!((cuda.cuMemcpy)(ptr, copy, 16));
        ok!((cuda.cuMemcpyAsync)(ptr, copy, 16, std::ptr::null_mut()));
        assert_eq!(
            rc!((cuda.cuMemcpyAsync)(ptr, copy, 16, 0x999 as CUstream)),
            CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(
            rc!((cuda.cuMemcpyHtoD_v2)(ptr, std::ptr::null(), 16)),
            CUDA_ERROR_INVALID_VALUE
        );
        ok!((cuda.cuMemcpyHtoD_v2)(ptr, std::ptr::null(), 0));

        // A big allocation is a lazily-committed mapping; touching part of it is fine.
        let big = cuda.alloc(3 * GIB).unwrap();
        ok!((cuda.cuMemsetD8_v2)(big + 2 * GIB, 1, 4096));

        let (mut base, mut size) = (0u64, 0usize);
        ok!((cuda.cuMemGetAddressRange_v2)(
            &mut base,
            &mut size,
            ptr + 1000
        ));
        assert_eq!((base, size as u64), (ptr, MIB));
        assert_eq!(
            rc!((cuda.cuMemGetAddressRange_v2)(&mut base, &mut size, 16)),
            CUDA_ERROR_NOT_FOUND
        );

        for p in [ptr, copy, big] {
            ok!((cuda.cuMemFree_v2)(p));
        }
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(0)), 0);
    });
}

#[test]
fn frees_of_unknown_pointers_are_invalid() {
    scenario("frees_of_unknown_pointers_are_invalid", |cuda| {
        cuda.init_device(0);
        let ptr = cuda.alloc(4096).unwrap();
        assert_eq!(
            rc!((cuda.cuMemFree_v2)(ptr + 256)),
            CUDA_ERROR_INVALID_VALUE,
            "interior pointer"
        );
        assert_eq!(
            rc!((cuda.cuMemFree_v2)(123_456_789)),
            CUDA_ERROR_INVALID_VALUE,
            "never allocated"
        );
        assert_eq!(rc!((cuda.cuMemFree_v2)(0)), CUDA_ERROR_INVALID_VALUE);
        ok!((cuda.cuMemFree_v2)(ptr));
        assert_eq!(
            rc!((cuda.cuMemFree_v2)(ptr)),
            CUDA_ERROR_INVALID_VALUE,
            "double free"
        );
        assert_eq!(cuda.alloc(0), Err(CUDA_ERROR_INVALID_VALUE));
        assert_eq!(
            rc!((cuda.cuMemAlloc_v2)(std::ptr::null_mut(), 16)),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(0)),
            0,
            "nothing leaked or underflowed"
        );
    });
}

#[test]
fn the_card_is_a_physical_limit() {
    scenario("the_card_is_a_physical_limit", |cuda| {
        cuda.init_device(1);
        assert_eq!(cuda.mem_info(), (GIB, GIB));
        let first = cuda.alloc(600 * MIB).unwrap();
        assert_eq!(cuda.mem_info(), (GIB - 600 * MIB, GIB));
        assert_eq!(cuda.alloc(600 * MIB), Err(CUDA_ERROR_OUT_OF_MEMORY));
        assert_eq!(
            rc!((cuda.fakegpu_device_memory_used)(1)),
            600 * MIB,
            "a refused allocation takes nothing"
        );
        let rest = cuda.alloc(GIB - 600 * MIB).unwrap();
        assert_eq!(
            cuda.alloc(1),
            Err(CUDA_ERROR_OUT_OF_MEMORY),
            "not one byte more"
        );
        assert_eq!(cuda.mem_info().0, 0);
        // Device 0 is another card.
        let mut ctx = std::ptr::null_mut();
        ok!((cuda.cuDevicePrimaryCtxRetain)(&mut ctx, 0));
        ok!((cuda.cuCtxPushCurrent_v2)(ctx));
        let other = cuda.alloc(GIB).unwrap();
        ok!((cuda.cuMemFree_v2)(other));
        ok!((cuda.cuCtxPopCurrent_v2)(std::ptr::null_mut()));
        ok!((cuda.cuMemFree_v2)(first));
        ok!((cuda.cuMemFree_v2)(rest));
        assert_eq!(cuda.mem_info(), (GIB, GIB));
    });
}

#[test]
fn pitched_allocations_charge_pitch_times_height() {
    scenario("pitched_allocations_charge_pitch_times_height", |cuda| {
        cuda.init_device(0);
        let (mut ptr, mut pitch) = (0u64, 0usize);
        ok!((cuda.cuMemAllocPitch_v2)(
            &mut ptr, &mut pitch, 1000, 1000, 4
        ));
        assert_eq!(pitch, 1024);
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(0)), 1024 * 1000);
        ok!((cuda.cuMemFree_v2)(ptr));
        assert_eq!(
            rc!((cuda.cuMemAllocPitch_v2)(
                &mut ptr, &mut pitch, 1000, 1000, 3
            )),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            rc!((cuda.cuMemAllocPitch_v2)(&mut ptr, &mut pitch, 0, 1000, 4)),
            CUDA_ERROR_INVALID_VALUE
        );
    });
}

#[test]
fn managed_memory_is_counted_apart() {
    scenario("managed_memory_is_counted_apart", |cuda| {
        cuda.init_device(1);
        let mut ptr = 0u64;
        ok!((cuda.cuMemAllocManaged)(
            &mut ptr,
            (3 * GIB) as usize,
            CU_MEM_ATTACH_GLOBAL
        ));
        assert_eq!(
            rc!((cuda.fakegpu_managed_memory_used)(1)),
            3 * GIB,
            "more than the 1 GiB card: not limited"
        );
        assert_eq!(rc!((cuda.fakegpu_process_managed_memory_used)(1)), 3 * GIB);
        assert_eq!(
            rc!((cuda.fakegpu_device_memory_used)(1)),
            0,
            "not device memory"
        );
        assert_eq!(cuda.mem_info().0, GIB);
        ok!((cuda.cuMemsetD8_v2)(ptr, 7, 4096));
        ok!((cuda.cuMemFree_v2)(ptr));
        assert_eq!(rc!((cuda.fakegpu_managed_memory_used)(1)), 0);
        assert_eq!(
            rc!((cuda.cuMemAllocManaged)(&mut ptr, 4096, 0)),
            CUDA_ERROR_INVALID_VALUE,
            "one attach flag"
        );
        assert_eq!(
            rc!((cuda.cuMemAllocManaged)(&mut ptr, 4096, 3)),
            CUDA_ERROR_INVALID_VALUE
        );
    });
}

#[test]
fn managed_memory_takes_advice_and_prefetches_in_both_signatures() {
    scenario(
        "managed_memory_takes_advice_and_prefetches_in_both_signatures",
        |cuda| {
            cuda.init_device(1);
            let (mut a, mut b) = (0u64, 0u64);
            ok!((cuda.cuMemAllocManaged)(
                &mut a,
                (2 * GIB) as usize,
                CU_MEM_ATTACH_GLOBAL
            ));
            ok!((cuda.cuMemAllocManaged)(
                &mut b,
                GIB as usize,
                CU_MEM_ATTACH_GLOBAL
            ));
            const PREFERRED: c_int = 3;
            const ACCESSED_BY: c_int = 5;
            let host = CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_HOST,
                id: 0,
            };
            let device = CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: 0,
            };
            // CUDA 8's signature: an ordinal, -1 for the host.
            ok!((cuda.cuMemAdvise)(a, (2 * GIB) as usize, PREFERRED, -1));
            ok!((cuda.cuMemAdvise)(a, (2 * GIB) as usize, ACCESSED_BY, 0));
            assert_eq!(
                rc!((cuda.fakegpu_process_managed_host_preferred)()),
                2 * GIB
            );
            // CUDA 12.2's: a CUmemLocation.
            ok!((cuda.cuMemAdvise_v2)(b, GIB as usize, PREFERRED, host));
            assert_eq!(
                rc!((cuda.fakegpu_process_managed_host_preferred)()),
                3 * GIB
            );
            ok!((cuda.cuMemAdvise_v2)(b, GIB as usize, PREFERRED, device));
            assert_eq!(
                rc!((cuda.fakegpu_process_managed_host_preferred)()),
                2 * GIB,
                "preferring the device undoes the host preference"
            );
            let nowhere = CUmemLocation { type_: 0, id: 0 };
            assert_eq!(
                rc!((cuda.cuMemAdvise_v2)(b, GIB as usize, PREFERRED, nowhere)),
                CUDA_ERROR_INVALID_VALUE
            );
            ok!((cuda.cuMemPrefetchAsync)(a, 4096, -1, std::ptr::null_mut()));
            ok!((cuda.cuMemPrefetchAsync_v2)(
                b,
                4096,
                device,
                0,
                std::ptr::null_mut()
            ));
            assert_eq!(
                rc!((cuda.cuMemPrefetchAsync_v2)(
                    b,
                    4096,
                    device,
                    1,
                    std::ptr::null_mut()
                )),
                CUDA_ERROR_INVALID_VALUE,
                "no prefetch flags are defined"
            );
            assert_eq!(
                rc!((cuda.cuMemPrefetchAsync_v2)(
                    b,
                    2 * GIB as usize,
                    host,
                    0,
                    std::ptr::null_mut()
                )),
                CUDA_ERROR_INVALID_VALUE,
                "past the allocation"
            );
            ok!((cuda.cuMemFree_v2)(a));
            ok!((cuda.cuMemFree_v2)(b));
            assert_eq!(rc!((cuda.fakegpu_process_managed_host_preferred)()), 0);
        },
    );
}

#[test]
fn page_locked_host_memory_is_not_device_memory() {
    scenario("page_locked_host_memory_is_not_device_memory", |cuda| {
        cuda.init_device(1);
        let (mut a, mut b): (*mut c_void, *mut c_void) =
            (std::ptr::null_mut(), std::ptr::null_mut());
        ok!((cuda.cuMemAllocHost_v2)(&mut a, (2 * GIB) as usize));
        ok!((cuda.cuMemHostAlloc)(
            &mut b,
            4096,
            CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP
        ));
        assert_eq!(rc!((cuda.fakegpu_host_memory_used)()), 2 * GIB + 4096);
        assert_eq!(rc!((cuda.fakegpu_device_memory_used)(1)), 0);
        unsafe { a.cast::<u8>().write(1) };
        assert_eq!(
            rc!((cuda.cuMemFree_v2)(a as u64)),
            CUDA_ERROR_INVALID_VALUE,
            "not a device allocation"
        );
        let device = cuda.alloc(4096).unwrap();
        assert_eq!(
            rc!((cuda.cuMemFreeHost)(device as *mut c_void)),
            CUDA_ERROR_INVALID_VALUE,
            "not a host allocation"
        );
        ok!((cuda.cuMemFreeHost)(a));
        ok!((cuda.cuMemFreeHost)(b));
        ok!((cuda.cuMemFree_v2)(device));
        assert_eq!(rc!((cuda.fakegpu_host_memory_used)()), 0);
        assert_eq!(
            rc!((cuda.cuMemHostAlloc)(&mut b, 4096, 0x80)),
            CUDA_ERROR_INVALID_VALUE
        );
    });
}

#[test]
fn async_and_pool_allocations() {
    scenario("async_and_pool_allocations", |cuda| {
        cuda.init_device(0);
        let null = std::ptr::null_mut();
        let mut ptr = 0u64;
        ok!((cuda.cuMemAllocAsync)(&mut ptr, (100 * MIB) as usize, null));
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(0)), 100 * MIB);
        ok!((cuda.cuMemFreeAsync)(ptr, null));
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(0)),
            0,
            "no caching: back at once"
        );

        let mut stream = std::ptr::null_mut();
        ok!((cuda.cuStreamCreate)(&mut stream, 0));
        let mut pool = std::ptr::null_mut();
        ok!((cuda.cuDeviceGetDefaultMemPool)(&mut pool, 0));
        ok!((cuda.cuMemAllocFromPoolAsync)(
            &mut ptr,
            (10 * MIB) as usize,
            pool,
            stream
        ));
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(0)), 10 * MIB);
        ok!((cuda.cuMemFree_v2)(ptr));
        assert_eq!(
            rc!((cuda.cuMemPoolDestroy)(pool)),
            CUDA_ERROR_INVALID_VALUE,
            "the default pool stays"
        );
        ok!((cuda.cuMemPoolTrimTo)(pool, 0));

        // A pool on device 1 charges device 1, whatever context is current.
        let props = CUmemPoolProps {
            location: CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: 1,
            },
            ..Default::default()
        };
        let mut pool1 = std::ptr::null_mut();
        ok!((cuda.cuMemPoolCreate)(&mut pool1, &props));
        ok!((cuda.cuMemAllocFromPoolAsync)(
            &mut ptr,
            (700 * MIB) as usize,
            pool1,
            null
        ));
        assert_eq!(
            (
                rc!((cuda.fakegpu_process_memory_used)(0)),
                rc!((cuda.fakegpu_process_memory_used)(1))
            ),
            (0, 700 * MIB)
        );
        assert_eq!(
            rc!((cuda.cuMemAllocFromPoolAsync)(
                &mut ptr,
                (700 * MIB) as usize,
                pool1,
                null
            )),
            CUDA_ERROR_OUT_OF_MEMORY
        );
        ok!((cuda.cuMemPoolDestroy)(pool1));
        assert_eq!(
            rc!((cuda.cuMemAllocFromPoolAsync)(&mut ptr, 16, pool1, null)),
            CUDA_ERROR_INVALID_VALUE,
            "destroyed pool"
        );
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            700 * MIB,
            "its allocations outlive it"
        );

        let bad = CUmemPoolProps {
            location: CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: 9,
            },
            ..Default::default()
        };
        assert_eq!(
            rc!((cuda.cuMemPoolCreate)(&mut pool1, &bad)),
            CUDA_ERROR_INVALID_DEVICE
        );
        assert_eq!(
            rc!((cuda.cuMemAllocAsync)(&mut ptr, 16, 0x4242 as CUstream)),
            CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(
            rc!((cuda.cuMemFreeAsync)(12345, null)),
            CUDA_ERROR_INVALID_VALUE
        );
    });
}

#[test]
fn vmm_maps_one_physical_allocation_at_several_addresses() {
    scenario(
        "vmm_maps_one_physical_allocation_at_several_addresses",
        |cuda| {
            ok!((cuda.cuInit)(0));
            // No context: VMM allocations name their device, as NCCL's threads do.
            let prop = vmm_prop(1);
            let mut granularity = 0usize;
            ok!((cuda.cuMemGetAllocationGranularity)(
                &mut granularity,
                &prop,
                CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
            ));
            assert_eq!(granularity as u64, 2 * MIB);
            let size = 4 * MIB as usize;
            let mut handle = 0u64;
            assert_eq!(
                rc!((cuda.cuMemCreate)(&mut handle, size + 4096, &prop, 0)),
                CUDA_ERROR_INVALID_VALUE,
                "granularity"
            );
            ok!((cuda.cuMemCreate)(&mut handle, size, &prop, 0));
            assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 4 * MIB);
            let mut huge = 0u64;
            assert_eq!(
                rc!((cuda.cuMemCreate)(&mut huge, GIB as usize, &prop, 0)),
                CUDA_ERROR_OUT_OF_MEMORY,
                "past the 1 GiB card"
            );

            let (mut a, mut b) = (0u64, 0u64);
            ok!((cuda.cuMemAddressReserve)(&mut a, 2 * size, 0, 0, 0));
            ok!((cuda.cuMemAddressReserve)(&mut b, size, 0, 0, 0));
            assert_eq!(a % (2 * MIB), 0);
            ok!((cuda.cuMemMap)(a, size, 0, handle, 0));
            ok!((cuda.cuMemMap)(b, size, 0, handle, 0));
            assert_eq!(
                rc!((cuda.cuMemMap)(a, size, 0, handle, 0)),
                CUDA_ERROR_INVALID_VALUE,
                "already mapped there"
            );
            assert_eq!(
                rc!((cuda.cuMemMap)(
                    a + size as u64,
                    size,
                    2 * MIB as usize,
                    handle,
                    0
                )),
                CUDA_ERROR_INVALID_VALUE,
                "past the allocation"
            );
            let access = CUmemAccessDesc {
                location: prop.location,
                flags: CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            ok!((cuda.cuMemSetAccess)(a, size, &access, 1));
            assert_eq!(
                rc!((cuda.cuMemSetAccess)(a, 2 * size, &access, 1)),
                CUDA_ERROR_INVALID_VALUE,
                "half unmapped"
            );

            // Bytes written through one mapping are seen through the other.
            unsafe { ((a + 12345) as *mut u8).write(42) };
            assert_eq!(unsafe { ((b + 12345) as *const u8).read() }, 42);
            let (mut base, mut len) = (0u64, 0usize);
            ok!((cuda.cuMemGetAddressRange_v2)(&mut base, &mut len, b + 100));
            assert_eq!((base, len), (b, size));

            // Released while mapped: the memory stays until the last mapping goes.
            ok!((cuda.cuMemRelease)(handle));
            assert_eq!(rc!((cuda.cuMemRelease)(handle)), CUDA_ERROR_INVALID_VALUE);
            assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 4 * MIB);
            ok!((cuda.cuMemUnmap)(a, size));
            assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 4 * MIB);
            assert_eq!(
                rc!((cuda.cuMemUnmap)(b, 2 * MIB as usize)),
                CUDA_ERROR_INVALID_VALUE,
                "part of a mapping"
            );
            ok!((cuda.cuMemUnmap)(b, size));
            assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 0);
            ok!((cuda.cuMemAddressFree)(a, 2 * size));
            ok!((cuda.cuMemAddressFree)(b, size));
            assert_eq!(
                rc!((cuda.cuMemAddressFree)(b, size)),
                CUDA_ERROR_INVALID_VALUE
            );

            // Freeing a reservation unmaps what is left in it.
            ok!((cuda.cuMemCreate)(&mut handle, size, &prop, 0));
            ok!((cuda.cuMemAddressReserve)(&mut a, size, 0, 0, 0));
            ok!((cuda.cuMemMap)(a, size, 0, handle, 0));
            ok!((cuda.cuMemRelease)(handle));
            ok!((cuda.cuMemAddressFree)(a, size));
            assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 0);

            let wrong = CUmemAllocationProp {
                location: CUmemLocation {
                    type_: CU_MEM_LOCATION_TYPE_HOST,
                    id: 0,
                },
                ..Default::default()
            };
            assert_eq!(
                rc!((cuda.cuMemCreate)(&mut handle, size, &wrong, 0)),
                CUDA_ERROR_INVALID_VALUE
            );
            assert_eq!(
                rc!((cuda.cuMemCreate)(&mut handle, size, &vmm_prop(7), 0)),
                CUDA_ERROR_INVALID_DEVICE
            );
        },
    );
}

#[test]
fn arrays_are_device_memory() {
    scenario("arrays_are_device_memory", |cuda| {
        cuda.init_device(1);
        let float_2d = CUDA_ARRAY_DESCRIPTOR {
            width: 8192,
            height: 8192,
            format: CU_AD_FORMAT_FLOAT,
            num_channels: 1,
        };
        let mut arrays = Vec::new();
        for _ in 0..4 {
            let mut array = std::ptr::null_mut();
            ok!((cuda.cuArrayCreate_v2)(&mut array, &float_2d));
            arrays.push(array);
        }
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            GIB,
            "4 × 256 MiB"
        );
        let mut array = std::ptr::null_mut();
        assert_eq!(
            rc!((cuda.cuArrayCreate_v2)(&mut array, &float_2d)),
            CUDA_ERROR_OUT_OF_MEMORY
        );
        for array in arrays {
            ok!((cuda.cuArrayDestroy)(array));
        }
        assert_eq!(rc!((cuda.cuArrayDestroy)(array)), CUDA_ERROR_INVALID_HANDLE);

        // 1D (height 0), 3D with four half-float channels.
        let line = CUDA_ARRAY_DESCRIPTOR {
            width: 1000,
            height: 0,
            format: CU_AD_FORMAT_UNSIGNED_INT8,
            num_channels: 2,
        };
        ok!((cuda.cuArrayCreate_v2)(&mut array, &line));
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 2000);
        ok!((cuda.cuArrayDestroy)(array));
        let volume = CUDA_ARRAY3D_DESCRIPTOR {
            width: 64,
            height: 32,
            depth: 16,
            format: CU_AD_FORMAT_HALF,
            num_channels: 4,
            flags: 0,
        };
        ok!((cuda.cuArray3DCreate_v2)(&mut array, &volume));
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            64 * 32 * 16 * 4 * 2
        );
        ok!((cuda.cuArrayDestroy)(array));

        // Mipmaps: each level halves every extent (at least 1).
        let mut mip = std::ptr::null_mut();
        let square = CUDA_ARRAY3D_DESCRIPTOR {
            width: 256,
            height: 256,
            depth: 0,
            format: CU_AD_FORMAT_FLOAT,
            num_channels: 1,
            flags: 0,
        };
        ok!((cuda.cuMipmappedArrayCreate)(&mut mip, &square, 3));
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            (256 * 256 + 128 * 128 + 64 * 64) * 4
        );
        ok!((cuda.cuMipmappedArrayDestroy)(mip));
        assert_eq!(
            rc!((cuda.cuMipmappedArrayCreate)(&mut mip, &square, 10)),
            CUDA_ERROR_INVALID_VALUE,
            "256 has 9 levels"
        );
        assert_eq!(
            rc!((cuda.cuMipmappedArrayCreate)(&mut mip, &square, 0)),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 0);

        let three_channels = CUDA_ARRAY_DESCRIPTOR {
            num_channels: 3,
            ..line
        };
        assert_eq!(
            rc!((cuda.cuArrayCreate_v2)(&mut array, &three_channels)),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            rc!((cuda.cuArrayCreate_v2)(&mut array, std::ptr::null())),
            CUDA_ERROR_INVALID_VALUE
        );
    });
}

#[test]
fn threads_allocate_and_free_at_once() {
    scenario("threads_allocate_and_free_at_once", |cuda| {
        let ctx = cuda.init_device(0) as usize;
        std::thread::scope(|s| {
            for t in 0..8u64 {
                s.spawn(move || {
                    ok!((cuda.cuCtxSetCurrent)(ctx as CUcontext));
                    let mut held = Vec::new();
                    for i in 0..2000u64 {
                        let size = 256 + (i * 7919 + t) % 200_000;
                        held.push(cuda.alloc(size).unwrap());
                        if held.len() > 16 {
                            ok!((cuda.cuMemFree_v2)(held.swap_remove((i % 16) as usize)));
                        }
                    }
                    for ptr in held {
                        ok!((cuda.cuMemFree_v2)(ptr));
                    }
                });
            }
        });
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(0)),
            0,
            "every byte given back"
        );
        assert_eq!(rc!((cuda.fakegpu_device_memory_used)(0)), 0);
    });
}
