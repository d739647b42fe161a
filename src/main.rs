//! The `myelin` binary; everything lives in the library.

/// jemalloc: the server makes and drops many small values across threads
/// (parsed events, JSON trees, buffers); the system allocator spent a
/// third of an initial sync's time in itself (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Blocks from this size up that RocksDB (the main user of the C library's
/// allocator here) asks for are mapped for themselves and given back to
/// the system when freed: its memtables' 1 MiB blocks, above all.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const SYSTEM_MMAP_THRESHOLD: libc::c_int = 256 * 1024;

fn main() -> std::process::ExitCode {
    // By default glibc raises this threshold to the size of each mapped
    // block freed, after which a flushed memtable's blocks stay in its
    // heaps: the process's resident memory then keeps every memtable's
    // high-water mark and creeps up under a steady load, while the
    // memory in use does not (`docs/benchmarks.md`, the soak). A fixed
    // threshold keeps them mapped, and resident memory follows use.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the C allocator's parameters; it is
    // called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, SYSTEM_MMAP_THRESHOLD);
    }
    myelin::cli::main()
}
