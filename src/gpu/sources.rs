//! The kernel sources embedded by build.rs: `SOURCES` (kernels/*.cu) and `HEADERS` (kernels/*.cuh),
//! each a table of (file name, text).

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// Text of one embedded kernel source file, by file name.
pub fn source(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
