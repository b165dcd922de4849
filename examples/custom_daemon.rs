//! Your own daemon on the rpcd crate: the whole of rpcd (config, master,
//! workers, ZooKeeper, control socket, systemd) with your methods served
//! in-process, beside the built-ins and any handler processes the config
//! routes to.
//!
//! ```sh
//! cargo build --release --example custom_daemon
//! target/release/examples/custom_daemon --config /etc/rpcd.toml
//! rpcctl call add '[2, 3]' --addr 127.0.0.1:8001     # -> sum 5
//! ```
//!
//! Workers are this same binary run with `--worker`, so they serve these
//! methods too.

use rpcd::{MethodError, Methods};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Deserialize)]
struct Greet {
    name: String,
    #[serde(default)]
    shout: bool,
}

#[derive(Serialize)]
struct Greeting {
    text: String,
    length: usize,
}

fn main() {
    let mut m = Methods::new(); // the built-ins: ping, pi

    // Synchronous, typed: params [a, b] -> {"out": "sum", "result": a + b}.
    m.method("add", |(a, b): (i64, i64)| {
        a.checked_add(b).ok_or_else(|| MethodError::bad_params("add: the sum overflows a 64-bit integer"))
    })
    .out("sum");

    // Structs in and out, with serde.
    m.method("greet", |g: Greet| {
        let text = if g.shout { format!("HELLO, {}!", g.name.to_uppercase()) } else { format!("Hello, {}.", g.name) };
        Ok::<_, MethodError>(Greeting { length: text.chars().count(), text })
    })
    .out("greeting");

    // Any JSON back as it came: what a typed echo costs (bench/run) ...
    m.method("echo", |v: serde_json::Value| Ok::<_, MethodError>(v)).out("pong");
    // ... and the same on raw JSON text, as the built-in ping is registered.
    m.raw_method("echo_raw", |params, out| {
        out.extend_from_slice(params.as_bytes());
        Ok(())
    })
    .out("pong");

    // Your own error codes.
    m.method("divide", |(a, b): (f64, f64)| {
        if b == 0.0 {
            return Err(MethodError::new("division_by_zero", "divide: b must not be 0"));
        }
        Ok(a / b)
    })
    .out("quotient");

    // Asynchronous: runs on the worker's thread without blocking it; gets
    // `timeout` after [methods.sleep_ms] timeout_ms (default 5000).
    m.async_method("sleep_ms", |ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, MethodError>(ms)
    })
    .out("slept");

    rpcd::main(m)
}
