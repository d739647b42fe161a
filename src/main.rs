//! The `myelin` binary; everything lives in the library.

/// jemalloc: the server makes and drops many small values across threads
/// (parsed events, JSON trees, buffers); the system allocator spent a
/// third of an initial sync's time in itself (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    myelin::cli::main()
}
