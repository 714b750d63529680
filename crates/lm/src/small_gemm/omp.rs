//! libgomp's `GOMP_parallel`, looked up in the process libtorch loaded it into, so the kernel's
//! threads are the pool libtorch's own ops run on.

use std::ffi::c_void;
use std::sync::OnceLock;

pub(super) type Body = unsafe extern "C" fn(*mut c_void);
pub(super) type Parallel = unsafe extern "C" fn(Body, *mut c_void, u32, u32);
pub(super) type ThreadNum = unsafe extern "C" fn() -> i32;

pub(super) struct Omp {
    pub(super) parallel: Parallel,
    pub(super) thread_num: ThreadNum,
    pub(super) num_threads: ThreadNum,
}

/// libgomp's entry points, if libtorch loaded it into this process.
pub(super) fn omp() -> Option<&'static Omp> {
    static OMP: OnceLock<Option<Omp>> = OnceLock::new();
    OMP.get_or_init(|| {
        // SAFETY: dlsym only looks the names up; the signatures are libgomp's stable ABI
        // (`GOMP_parallel` since GCC 4.9, the `omp_*` queries since OpenMP 1.0).
        unsafe {
            let find = |name: &std::ffi::CStr| libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
            let (p, t, n) = (
                find(c"GOMP_parallel"),
                find(c"omp_get_thread_num"),
                find(c"omp_get_num_threads"),
            );
            if p.is_null() || t.is_null() || n.is_null() {
                return None;
            }
            Some(Omp {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(p),
                thread_num: std::mem::transmute::<*mut c_void, ThreadNum>(t),
                num_threads: std::mem::transmute::<*mut c_void, ThreadNum>(n),
            })
        }
    })
    .as_ref()
}
