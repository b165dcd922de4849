//! The rpcd daemon: the built-in methods, and handler processes from the
//! configuration. (A Rust user's own daemon is the same with their methods:
//! see `rpcd::methods`.)

fn main() {
    rpcd::main(rpcd::Methods::new())
}
