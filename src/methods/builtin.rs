//! The built-in methods, `ping` and `pi` (SPEC §2), registered through the
//! same API as a library user's methods ([`super::Methods`]).

use super::{MethodError, Methods};
use crate::protocol::{self, ErrorCode};

/// Registers `ping` and `pi` on `m`.
pub(super) fn register(m: &mut Methods) {
    m.raw_method("ping", |params, out| {
        ping(params, out);
        Ok(())
    })
    .out("pong");
    m.raw_method_with_config("pi", |cfg| {
        let max_terms = cfg.pi_max_terms();
        move |params: &str, out: &mut Vec<u8>| pi(params, max_terms, out)
    })
    .out("pi_r");
}

/// `ping`: the params, unchanged.
pub fn ping(params: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(params.as_bytes());
}

/// `pi`: params an integer n >= 0 (at most `max_terms`), result the
/// original's series, bit-identical, in shortest round-trip form.
pub fn pi(params: &str, max_terms: u64, out: &mut Vec<u8>) -> Result<(), MethodError> {
    match protocol::pi_terms(params) {
        Ok(n) if n <= max_terms => {
            let mut b = ryu::Buffer::new();
            out.extend_from_slice(b.format_finite(protocol::pi(n)).as_bytes());
            Ok(())
        }
        Ok(n) => Err(MethodError::bad_params(format!("pi: n = {n} is over the limit of {max_terms} terms"))),
        Err(_) => Err(MethodError::bad_params("pi: params must be an integer n >= 0")),
    }
}

/// A built-in-only worker's answer to a parsed call (see
/// [`protocol::handle`]): exactly one frame appended to `out`.
pub fn answer(method: &str, params: &str, id: Option<&str>, pi_max_terms: u64, out: &mut Vec<u8>) -> Option<ErrorCode> {
    match method {
        "ping" => {
            protocol::ok_frame(out, "pong", params.as_bytes(), id);
            None
        }
        "pi" => {
            let mut result = Vec::new();
            match pi(params, pi_max_terms, &mut result) {
                Ok(()) => {
                    protocol::ok_frame(out, "pi_r", &result, id);
                    None
                }
                Err(e) => {
                    protocol::error_frame_code(out, &e.code, &e.message, id);
                    Some(ErrorCode::BadParams)
                }
            }
        }
        other => {
            protocol::unknown_method(out, other, id);
            Some(ErrorCode::UnknownMethod)
        }
    }
}
