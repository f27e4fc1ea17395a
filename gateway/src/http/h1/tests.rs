#[test]
fn host_values_follow_rfc_3986_authority_without_userinfo() {
    for good in [
        &b"shop.example"[..],
        b"shop.example:8080",
        b"127.0.0.1",
        b"127.0.0.1:80",
        b"[::1]",
        b"[::1]:8080",
        b"[2001:db8::7]",
        b"[v1.fe80::a+en1]",
        b"xn--bcher-kva.example",
        b"caf%C3%A9.example",
        b"localhost:",
        b"",
    ] {
        assert!(
            super::is_valid_host(good),
            "{:?}",
            String::from_utf8_lossy(good)
        );
    }
    for bad in [
        &b"user@shop.example"[..],
        b"shop.example/path",
        b"shop.example:80:81",
        b"shop.example:port",
        b"shop.example:123456",
        b"shop example",
        b"[::1",
        b"[::1]x",
        b"[]",
        b"[::g]",
        b"caf%C.example",
        b"a\tb",
        b"shop.example?",
        b"shop.example#",
    ] {
        assert!(
            !super::is_valid_host(bad),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

use super::*;

fn head(method: &Method, text: &str) -> Result<Option<ResponseHead>, ProtocolError> {
    let mut buf = BytesMut::from(text.as_bytes());
    parse_response(&mut buf, method)
}

#[test]
fn encodes_the_request_head_with_forwarding_headers() {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("shop.example"));
    headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
    headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
    headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
    headers.insert(crate::http::REQUEST_ID, HeaderValue::from_static("bad id"));
    headers.insert(
        crate::http::trace::TRACEPARENT,
        HeaderValue::from_static("inbound"),
    );
    let client = HeaderValue::from_static("127.0.0.1");
    let host = HeaderValue::from_static("shop.example");
    let request = RequestHead {
        method: &Method::POST,
        target: "/products?x=1",
        headers: &headers,
        framing: RequestFraming::Length,
        forwarded_for: &client,
        forwarded_host: Some(&host),
        request_id: &HeaderValue::from_static("r-1"),
        traceparent: b"00-01-02-01",
        drop_tracestate: true,
    };
    let mut out = Vec::new();
    request.encode(&HeaderValue::from_static("10.1.2.3:8081"), &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "POST /products?x=1 HTTP/1.1\r\nhost: 10.1.2.3:8081\r\nx-request-id: r-1\r\n\
         traceparent: 00-01-02-01\r\naccept: */*\r\n\
         content-length: 5\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n\
         x-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\n\r\n"
    );
}

#[test]
fn a_body_of_unknown_length_is_rechunked_without_content_length() {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
    headers.insert(
        crate::http::trace::TRACESTATE,
        HeaderValue::from_static("vendor=1"),
    );
    let client = HeaderValue::from_static("::1");
    let request = RequestHead {
        method: &Method::PUT,
        target: "/",
        headers: &headers,
        framing: RequestFraming::Chunked,
        forwarded_for: &client,
        forwarded_host: None,
        request_id: &HeaderValue::from_static("r-2"),
        traceparent: b"00-01-02-01",
        drop_tracestate: false,
    };
    let mut out = Vec::new();
    request.encode(&HeaderValue::from_static("u:1"), &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("content-length"), "{text}");
    assert!(
        text.contains("tracestate: vendor=1\r\n"),
        "a continued trace keeps it"
    );
    assert!(
        text.ends_with("transfer-encoding: chunked\r\n\r\n"),
        "{text}"
    );
    let mut chunk = Vec::new();
    encode_chunk(&[b'x'; 300], &mut chunk);
    assert!(chunk.starts_with(b"12c\r\nxxx"));
    assert!(chunk.ends_with(b"x\r\n"));
}

#[test]
fn parses_a_response_head_and_leaves_the_body() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"[..],
    );
    let head = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.framing, ResponseFraming::Length(5));
    assert!(head.keep_alive);
    assert_eq!(head.headers["content-type"], "text/plain");
    assert_eq!(&buf[..], b"hello");
}

#[test]
fn an_incomplete_head_asks_for_more_and_an_endless_one_is_refused() {
    assert!(
        head(&Method::GET, "HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none()
    );
    let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "y".repeat(MAX_HEAD_BYTES));
    assert!(matches!(
        head(&Method::GET, &endless),
        Err(ProtocolError::HeadTooLarge)
    ));
    assert!(head(&Method::GET, "HTTP/1.1 2x0 OK\r\n\r\n").is_err());
}

#[test]
fn framing_follows_rfc_9112() {
    let framing = |method: &Method, text: &str| {
        let h = head(method, text).unwrap().unwrap();
        (h.framing, h.keep_alive)
    };
    assert_eq!(
        framing(
            &Method::GET,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n"
        ),
        (ResponseFraming::Chunked, true)
    );
    assert_eq!(
        framing(
            &Method::GET,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"
        ),
        (ResponseFraming::UntilClose, false)
    );
    assert_eq!(
        framing(&Method::GET, "HTTP/1.1 200 OK\r\n\r\n"),
        (ResponseFraming::UntilClose, false)
    );
    assert_eq!(
        framing(
            &Method::HEAD,
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        ),
        (ResponseFraming::Empty, true)
    );
    assert_eq!(
        framing(
            &Method::GET,
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"
        ),
        (ResponseFraming::Empty, true)
    );
    assert_eq!(
        framing(&Method::GET, "HTTP/1.1 204 No Content\r\n\r\n"),
        (ResponseFraming::Empty, true)
    );
    assert_eq!(
        framing(
            &Method::GET,
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n"
        ),
        (ResponseFraming::Length(2), false)
    );
    assert_eq!(
        framing(&Method::GET, "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"),
        (ResponseFraming::Length(2), false)
    );
    assert!(matches!(
        head(
            &Method::GET,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"
        ),
        Err(ProtocolError::ContentLength)
    ));
    assert!(matches!(
        head(
            &Method::GET,
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"
        ),
        Err(ProtocolError::ContentLength)
    ));
}

#[test]
fn interim_responses_are_skipped_and_switching_protocols_refused() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"[..],
    );
    let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
    assert_eq!(head.status, StatusCode::CREATED);
    assert!(!head.headers.contains_key("link"));
    assert!(buf.is_empty());
    assert!(matches!(
        self::head(&Method::GET, "HTTP/1.1 101 Switching Protocols\r\n\r\n"),
        Err(ProtocolError::Switching(101))
    ));
}

fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), ProtocolError> {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::NeedMore => break,
                Decoded::Done => return Ok((out, buf.is_empty())),
            }
        }
    }
    Ok((out, false))
}

#[test]
fn decodes_chunked_bodies_split_anywhere() {
    let body = b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-trailer: 1\r\n\r\n";
    for step in 1..body.len() {
        let (data, clean) = decode_all(body, step).unwrap();
        assert_eq!(&data[..], b"hello, world!!!", "step {step}");
        assert!(clean);
    }
    let (data, clean) = decode_all(b"0\r\n\r\n", 5).unwrap();
    assert!(data.is_empty() && clean);
}

#[test]
fn refuses_malformed_chunks() {
    for bad in [
        &b"\r\n"[..],
        b"5\r\nhelloXX",
        b"g\r\n",
        b"1111111111111111\r\n",
        b"5\nhello\r\n",
    ] {
        assert!(decode_all(bad, bad.len()).is_err(), "{bad:?}");
    }
    let (_, done) = decode_all(b"5\r\nhel", 3).unwrap();
    assert!(!done, "incomplete is not done");
}
