//! OTLP's `ExportTraceServiceRequest` in protobuf, written by hand: the handful of messages a
//! trace export needs is less code than a protobuf crate and its build step (ADR 0033).
//! Field numbers and wire types are those of opentelemetry-proto's
//! `collector/trace/v1/trace_service.proto`, `trace/v1/trace.proto`,
//! `common/v1/common.proto` and `resource/v1/resource.proto`; the test receiver decodes with
//! the generated classes of the official package, so a wrong number fails a test.

use super::{RequestTrace, Span, Value};

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `Span.flags`: the context of the span's parent is known, and whether it came from
/// another process.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

/// A nested message, written in place: its length goes into four bytes reserved before it
/// and filled in after, as a varint padded with continuation bits (the protobuf encoding
/// allows a varint's redundant bytes; the official Python decoder in tests/it/otel.rs reads
/// them).
/// One buffer for the whole export instead of one per nested message.
fn message(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, LEN);
    let at = out.len();
    out.extend_from_slice(&[0x80, 0x80, 0x80, 0x00]);
    write(out);
    let len = out.len() - at - 4;
    // Exports are far below 2^28 bytes (256 MiB): `batch_max` traces of a few KiB each.
    debug_assert!(len < 1 << 28);
    let len = len.min((1 << 28) - 1) as u32;
    out[at] = (len & 0x7f) as u8 | 0x80;
    out[at + 1] = ((len >> 7) & 0x7f) as u8 | 0x80;
    out[at + 2] = ((len >> 14) & 0x7f) as u8 | 0x80;
    out[at + 3] = ((len >> 21) & 0x7f) as u8;
}

fn any_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Str(s) => string(out, 1, s),
        Value::Bool(b) => {
            tag(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        Value::Int(i) => {
            tag(out, 3, VARINT);
            // int64 is written as its two's complement, ten bytes when negative.
            varint(out, *i as u64);
        }
        Value::Strs(items) => message(out, 5, |a| {
            for s in items {
                message(a, 1, |item| string(item, 1, s));
            }
        }),
    }
}

/// `KeyValue { key = 1; value = 2 }`, repeated as `field`.
fn attribute(out: &mut Vec<u8>, field: u32, key: &str, v: &Value) {
    message(out, field, |kv| {
        string(kv, 1, key);
        message(kv, 2, |any| any_value(any, v));
    });
}

fn span(out: &mut Vec<u8>, t: &RequestTrace, s: &Span, remote_parent: bool) {
    message(out, 2, |m| {
        bytes(m, 1, &t.trace_id);
        bytes(m, 2, &s.span_id);
        if let Some(state) = &t.tracestate {
            string(m, 3, state);
        }
        if let Some(p) = &s.parent_id {
            bytes(m, 4, p);
        }
        string(m, 5, &s.name);
        tag(m, 6, VARINT);
        varint(m, s.kind as u64);
        tag(m, 7, FIXED64);
        m.extend_from_slice(&s.start_ns.to_le_bytes());
        tag(m, 8, FIXED64);
        m.extend_from_slice(&s.end_ns.max(s.start_ns).to_le_bytes());
        for (k, v) in &s.attrs {
            attribute(m, 9, k, v);
        }
        // Status { message = 2; code = 3 }: ERROR is 2; OK is left to the unset default,
        // as the conventions ask of instrumentation.
        if let Some(why) = &s.error {
            message(m, 15, |st| {
                string(st, 2, why);
                tag(st, 3, VARINT);
                varint(st, 2);
            });
        }
        let mut flags = u32::from(t.flags) | HAS_IS_REMOTE;
        if remote_parent {
            flags |= IS_REMOTE;
        }
        tag(m, 16, FIXED32);
        m.extend_from_slice(&flags.to_le_bytes());
    });
}

/// What describes the exporting process: `service.name` and the configured extras.
pub struct Resource {
    pub attributes: Vec<(String, Value)>,
    pub scope_version: &'static str,
}

/// One export: every span of `traces`, under one resource and one instrumentation scope.
pub fn export_request(resource: &Resource, traces: &[RequestTrace]) -> Vec<u8> {
    let mut out = Vec::new();
    message(&mut out, 1, |rs| {
        message(rs, 1, |r| {
            for (k, v) in &resource.attributes {
                attribute(r, 1, k, v);
            }
        });
        message(rs, 2, |ss| {
            message(ss, 1, |scope| {
                string(scope, 1, "tollgate");
                string(scope, 2, resource.scope_version);
            });
            for t in traces {
                span(ss, t, &t.root, t.remote_parent);
                for child in &t.children {
                    span(ss, t, child, false);
                }
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_base_128() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        out.clear();
        varint(&mut out, (-1i64) as u64);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn an_attribute_is_a_key_value_message() {
        let mut out = Vec::new();
        attribute(&mut out, 9, "a", &Value::Int(1));
        // field 9 LEN (10 bytes, padded to four): key "a" (0a 01 61), value
        // AnyValue{int_value=1} (12, length 2 padded, 18 01)
        assert_eq!(
            out,
            [
                0x4a, 0x8a, 0x80, 0x80, 0x00, 0x0a, 0x01, b'a', 0x12, 0x82, 0x80, 0x80, 0x00, 0x18,
                0x01
            ]
        );
    }
}
