//! The `myelin` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    myelin::cli::main()
}
