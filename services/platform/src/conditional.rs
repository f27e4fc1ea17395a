//! Responses rendered once and served many times, with a strong validator.
//!
//! A [`Representation`] is a JSON body with an `ETag` derived from its bytes (SHA-256), so
//! every replica holding the same data hands out the same tag, and a client or the
//! gateway's cache revalidating with `If-None-Match` gets a bodiless 304 from any of them.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use headers::{ETag, HeaderMapExt, IfNoneMatch};
use sha2::{Digest, Sha256};

/// The request's `If-None-Match` and `If-Match` lines alone, as the `HeaderMap` that
/// [`Representation`]'s methods read: the extractor for handlers that answer
/// conditionally, where axum's `HeaderMap` extractor would copy every header line of the
/// request (the gateway forwards half a dozen) on every call.
#[derive(Debug, Default)]
pub struct Preconditions(HeaderMap);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Preconditions {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let mut only = HeaderMap::new();
        for name in [header::IF_NONE_MATCH, header::IF_MATCH] {
            for value in parts.headers.get_all(&name) {
                only.append(name.clone(), value.clone());
            }
        }
        Ok(Self(only))
    }
}

impl std::ops::Deref for Preconditions {
    type Target = HeaderMap;

    fn deref(&self) -> &HeaderMap {
        &self.0
    }
}

#[derive(Clone, Debug)]
pub struct Representation {
    body: Bytes,
    etag: ETag,
    etag_value: HeaderValue,
}

impl Representation {
    /// A JSON body; its tag is computed from the bytes.
    pub fn json(body: impl Into<Bytes>) -> Self {
        let body = body.into();
        let tag = tag_of([body.as_ref()]);
        Self::with_tag(body, &tag)
    }

    /// A JSON body whose tag the caller derived from what the body is made of (for
    /// example the tags of the items a page lists), to avoid hashing large bodies.
    pub fn json_tagged(body: impl Into<Bytes>, tag: &str) -> Self {
        Self::with_tag(body.into(), tag)
    }

    fn with_tag(body: Bytes, tag: &str) -> Self {
        let quoted = format!("\"{tag}\"");
        Self {
            body,
            etag: quoted.parse().expect("hex digits make a valid entity tag"),
            etag_value: HeaderValue::try_from(quoted).expect("hex digits are ASCII"),
        }
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The quoted entity tag, as sent in `ETag`.
    pub fn etag(&self) -> &HeaderValue {
        &self.etag_value
    }

    /// Does `If-Match` in `request` allow changing what this represents: absent, `*`, or
    /// naming this tag? Comparison is strong (RFC 9110 section 13.1.1), so a weak tag
    /// never matches. `Err` if the header is there but not a valid list of tags.
    pub fn if_match_passes(&self, request: &HeaderMap) -> Result<bool, crate::AppError> {
        let values = request.get_all(header::IF_MATCH);
        if values.iter().next().is_none() {
            return Ok(true);
        }
        let invalid =
            || crate::AppError::validation("If-Match", "must be * or a list of quoted entity tags");
        // The typed parser takes a bare `1` as a tag; the grammar does not.
        if !values
            .iter()
            .all(|v| v.to_str().is_ok_and(is_if_match_value))
        {
            return Err(invalid());
        }
        request
            .typed_get::<headers::IfMatch>()
            .map(|condition| condition.precondition_passes(&self.etag))
            .ok_or_else(invalid)
    }

    /// Does `If-None-Match` in `request` name this representation (or `*`)? Comparison is
    /// weak, as RFC 9110 section 13.1.2 requires for this header.
    pub fn is_current_for(&self, request: &HeaderMap) -> bool {
        request
            .typed_get::<IfNoneMatch>()
            .is_some_and(|condition| !condition.precondition_passes(&self.etag))
    }

    /// 200 with the body and its `ETag`, or 304 with only the tag when the request's
    /// `If-None-Match` already names it.
    pub fn respond_to(&self, request: &HeaderMap) -> Response {
        if self.is_current_for(request) {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
                .headers_mut()
                .insert(header::ETAG, self.etag_value.clone());
            response
        } else {
            self.with_status(StatusCode::OK)
        }
    }

    /// The whole body with `status` (201 for a created resource, say) and its `ETag`.
    pub fn with_status(&self, status: StatusCode) -> Response {
        let mut response = Response::new(Body::from(self.body.clone()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::ETAG, self.etag_value.clone());
        response
    }
}

/// A short hex digest (128 bits of SHA-256) of the given parts, in order.
/// `If-Match = "*" / #entity-tag` (RFC 9110 section 13.1.1), one header line's worth.
fn is_if_match_value(value: &str) -> bool {
    let value = value.trim();
    value == "*"
        || value
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .all(|member| {
                let opaque = member.strip_prefix("W/").unwrap_or(member);
                opaque.len() >= 2
                    && opaque.starts_with('"')
                    && opaque.ends_with('"')
                    && opaque[1..opaque.len() - 1]
                        .bytes()
                        .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
            })
            && value.split(',').any(|m| !m.trim().is_empty())
}

pub fn tag_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(if_none_match: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in if_none_match {
            headers.append(header::IF_NONE_MATCH, value.parse().unwrap());
        }
        headers
    }

    /// Both conditional headers come through with every line, and nothing else does, so
    /// a representation answers the extracted copy as it would the whole request.
    #[tokio::test]
    async fn preconditions_keep_every_conditional_line_and_nothing_else() {
        use axum::extract::FromRequestParts;
        let representation = Representation::json(&b"{}"[..]);
        let tag = representation.etag().to_str().unwrap().to_owned();
        let (mut parts, ()) = axum::http::Request::builder()
            .header(header::IF_NONE_MATCH, "\"other\"")
            .header(header::IF_NONE_MATCH, tag.as_str())
            .header(header::IF_MATCH, "\"stale\"")
            .header(header::AUTHORIZATION, "Bearer x")
            .header("x-request-id", "1")
            .body(())
            .unwrap()
            .into_parts();
        let only = Preconditions::from_request_parts(&mut parts, &())
            .await
            .unwrap();
        assert_eq!(only.len(), 3, "{only:?}");
        assert_eq!(only.get_all(header::IF_NONE_MATCH).iter().count(), 2);
        assert!(
            representation.is_current_for(&only),
            "the second line names it"
        );
        assert!(!representation.if_match_passes(&only).unwrap());
        assert_eq!(parts.headers.len(), 5, "the request keeps its headers");
    }

    #[test]
    fn the_tag_follows_the_bytes() {
        let a = Representation::json(&b"{\"id\":\"1\"}"[..]);
        let same = Representation::json(&b"{\"id\":\"1\"}"[..]);
        let other = Representation::json(&b"{\"id\":\"2\"}"[..]);
        assert_eq!(a.etag(), same.etag());
        assert_ne!(a.etag(), other.etag());
        let tag = a.etag().to_str().unwrap();
        assert!(
            tag.starts_with('"') && tag.ends_with('"') && tag.len() == 34,
            "{tag}"
        );
    }

    #[test]
    fn if_match_is_compared_strongly_and_malformed_lists_are_refused() {
        let r = Representation::json_tagged(&b"{}"[..], "3");
        let with = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::IF_MATCH, value.parse().unwrap());
            }
            r.if_match_passes(&headers).map_err(|e| e.field.unwrap())
        };
        assert_eq!(with(&[]), Ok(true));
        assert_eq!(with(&["\"3\""]), Ok(true));
        assert_eq!(with(&["*"]), Ok(true));
        assert_eq!(with(&["\"1\", \"3\""]), Ok(true));
        assert_eq!(with(&["\"1\"", "\"3\""]), Ok(true));
        assert_eq!(with(&["\"2\""]), Ok(false));
        assert_eq!(with(&["W/\"3\""]), Ok(false), "weak tags never match");
        for bad in ["3", "\"3", "\"a b\"", ",", "*, \"3\""] {
            assert_eq!(with(&[bad]), Err("If-Match".to_owned()), "{bad}");
        }
    }

    #[test]
    fn if_none_match_is_compared_weakly_and_as_a_list() {
        let r = Representation::json(&b"[]"[..]);
        let tag = r.etag().to_str().unwrap().to_owned();
        assert!(r.is_current_for(&request(&[&tag])));
        assert!(r.is_current_for(&request(&[&format!("W/{tag}")])));
        assert!(r.is_current_for(&request(&[&format!("\"x\", {tag}")])));
        assert!(r.is_current_for(&request(&["\"x\"", &tag])));
        assert!(r.is_current_for(&request(&["*"])));
        assert!(!r.is_current_for(&request(&["\"x\""])));
        assert!(!r.is_current_for(&request(&[])));
        // An unquoted tag is not a tag: the condition is ignored, the body sent.
        assert!(!r.is_current_for(&request(&[tag.trim_matches('"')])));
    }

    #[test]
    fn a_matching_request_gets_304_without_a_body() {
        let r = Representation::json(&b"[1]"[..]);
        let tag = r.etag().to_str().unwrap().to_owned();
        let hit = r.respond_to(&request(&[&tag]));
        assert_eq!(hit.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(hit.headers()[header::ETAG], tag.as_str());
        assert!(hit.headers().get(header::CONTENT_TYPE).is_none());
        let miss = r.respond_to(&request(&["\"old\""]));
        assert_eq!(miss.status(), StatusCode::OK);
        assert_eq!(miss.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(miss.headers()[header::ETAG], tag.as_str());
        let created = r.with_status(StatusCode::CREATED);
        assert_eq!(created.status(), StatusCode::CREATED);
        assert_eq!(created.headers()[header::ETAG], tag.as_str());
    }
}
