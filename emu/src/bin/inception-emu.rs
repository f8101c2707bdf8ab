//! `inception-emu path`: prints the emulated CUDA driver's path (tools/emu.sh uses it).

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("path") => println!("{}", inception_emu::driver_path().display()),
        _ => {
            eprintln!("usage: inception-emu path");
            std::process::exit(2);
        }
    }
}
