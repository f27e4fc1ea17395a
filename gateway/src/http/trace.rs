//! W3C trace context on the wire: the gateway continues the caller's trace (or starts
//! one) with a fresh span id of its own, so upstream spans are children of the gateway
//! hop. The sampling decision (the standard `OTEL_TRACES_SAMPLER` variables) travels in
//! the flags. The gateway's own span for a sampled request is the proxy's business
//! (`proxy::span`); this module only reads and writes the headers.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use shop_platform::telemetry::Sampler;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: u128,
    pub parent_span_id: Option<u64>,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceIds {
    /// `00-<trace id>-<span id>-<flags>`, written without the formatting machinery
    /// (this runs on every request).
    pub fn traceparent(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.traceparent_bytes()).expect("hex is a valid header")
    }

    /// Started here: any inbound `tracestate` belongs to no trace and is not passed on.
    pub fn is_new(&self) -> bool {
        self.parent_span_id.is_none()
    }

    /// `traceparent` as its 55 ASCII bytes.
    pub fn traceparent_bytes(&self) -> [u8; 55] {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        write_hex(&mut out[3..35], self.trace_id);
        out[35] = b'-';
        write_hex(&mut out[36..52], u128::from(self.span_id));
        out[52] = b'-';
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }
}

/// Lower-case hex of the low `out.len() * 4` bits of `value`, zero-padded.
pub fn write_hex(out: &mut [u8], mut value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // A byte (two digits) at a time: ids are formatted on every request.
    let mut pairs = out.rchunks_exact_mut(2);
    for pair in &mut pairs {
        let byte = value as u8;
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
        value >>= 8;
    }
    if let [odd] = pairs.into_remainder() {
        *odd = DIGITS[(value & 0xf) as usize];
    }
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids and version `ff` are invalid.
pub fn parse(value: &str) -> Option<(u128, u64, u8)> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2
        || version.eq_ignore_ascii_case("ff")
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !(hex(version) && hex(trace) && hex(span) && hex(flags)) {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok()?;
    let span_id = u64::from_str_radix(span, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace_id != 0 && span_id != 0).then_some((trace_id, span_id, flags))
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

/// The ids for the upstream hop; `sampler` decides the sampled flag (by default: the
/// caller's, or yes for a new trace). `traceparent` itself is the caller's to write (the
/// gateway writes it straight into the upstream request head), and so is dropping an
/// orphaned `tracestate` when the trace is new ([`TraceIds::is_new`]).
pub fn continue_trace(headers: &HeaderMap, sampler: &Sampler) -> TraceIds {
    let inbound = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse);
    match inbound {
        Some((trace_id, parent, flags)) => TraceIds {
            trace_id,
            parent_span_id: Some(parent),
            span_id: nonzero_u64(),
            sampled: sampler.should_sample(trace_id, Some(flags & 1 == 1)),
        },
        None => {
            let trace_id = fastrand::u128(1..);
            TraceIds {
                trace_id,
                parent_span_id: None,
                span_id: nonzero_u64(),
                sampled: sampler.should_sample(trace_id, None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the gateway sends upstream: the inbound headers with the new `traceparent`.
    fn propagate(headers: &mut HeaderMap, sampler: &Sampler) -> TraceIds {
        let ids = continue_trace(headers, sampler);
        if ids.is_new() {
            headers.remove(&TRACESTATE);
        }
        headers.insert(TRACEPARENT, ids.traceparent());
        ids
    }

    #[test]
    fn continues_a_valid_trace_with_a_new_span() {
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ids = propagate(&mut headers, &Sampler::parse(None, None));
        assert_eq!(ids.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ids.parent_span_id, Some(0x00f067aa0ba902b7));
        let out = headers[&TRACEPARENT].to_str().unwrap();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(!out.contains("00f067aa0ba902b7"));
        assert!(out.ends_with("-01"));
    }

    #[test]
    fn sampling_follows_the_caller_and_the_configured_sampler() {
        let unsampled_caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(unsampled_caller));
        assert!(!propagate(&mut headers, &Sampler::parse(None, None)).sampled);
        assert!(headers[&TRACEPARENT].to_str().unwrap().ends_with("-00"));

        let never = Sampler::parse(Some("parentbased_traceidratio"), Some("0"));
        let mut headers = HeaderMap::new();
        assert!(
            !propagate(&mut headers, &never).sampled,
            "a new trace at ratio 0"
        );
        assert!(headers[&TRACEPARENT].to_str().unwrap().ends_with("-00"));
        let sampled_caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(TRACEPARENT, HeaderValue::from_static(sampled_caller));
        assert!(
            propagate(&mut headers, &never).sampled,
            "the caller's decision wins"
        );
    }

    #[test]
    fn traceparent_is_formatted_exactly() {
        let ids = TraceIds {
            trace_id: 0xab,
            parent_span_id: None,
            span_id: 0x1f,
            sampled: true,
        };
        assert_eq!(
            ids.traceparent(),
            "00-000000000000000000000000000000ab-000000000000001f-01"
        );
        let ids = TraceIds {
            sampled: false,
            ..ids
        };
        assert!(ids.traceparent().to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn starts_a_trace_when_the_inbound_one_is_missing_or_invalid() {
        for bad in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(v) = bad {
                headers.insert(TRACEPARENT, HeaderValue::from_str(v).unwrap());
            }
            headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
            let ids = propagate(&mut headers, &Sampler::parse(None, None));
            assert_eq!(ids.parent_span_id, None, "{bad:?}");
            assert!(parse(headers[&TRACEPARENT].to_str().unwrap()).is_some());
            assert!(!headers.contains_key(&TRACESTATE));
        }
    }
}
