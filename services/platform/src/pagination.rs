//! Cursor pagination shared by list endpoints. The cursor is opaque to clients (base64 of
//! the last row's sequence number), so storage can change without breaking them. Lists
//! stay JSON arrays, as the seed API returns; the next page is announced in `Link` and
//! `X-Next-Cursor` headers.

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

use crate::error::AppError;

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 100;

/// Reads `limit` as the documents state it, an integer written in digits: `u32`'s own
/// parser would also take `+5`. Anything else is a 400 `invalid_query`.
pub fn limit<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    use serde::Deserialize;
    use serde::de::Error;
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(D::Error::custom(format!(
            "limit: {text:?} is not a whole number"
        )));
    }
    text.parse()
        .map(Some)
        .map_err(|_| D::Error::custom("limit: too large"))
}

/// What a list query asks storage for: rows after `after`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u32,
    pub after: i64,
}

impl PageRequest {
    pub fn parse(limit: Option<u32>, cursor: Option<&str>) -> Result<Self, AppError> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(AppError::validation(
                "limit",
                format!("must be between 1 and {MAX_LIMIT}"),
            ));
        }
        let after = match cursor.filter(|c| !c.is_empty()) {
            None => 0,
            Some(c) => decode_cursor(c).ok_or_else(|| {
                AppError::bad_request("invalid_cursor", "cursor is not one this API issued")
                    .with_field("cursor")
            })?,
        };
        Ok(Self { limit, after })
    }

    /// Storage fetches one extra row to learn whether another page exists.
    pub fn fetch_limit(&self) -> i64 {
        i64::from(self.limit) + 1
    }
}

pub fn encode_cursor(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{seq}"))
}

fn decode_cursor(cursor: &str) -> Option<i64> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    text.strip_prefix("v1:")?
        .parse()
        .ok()
        .filter(|s: &i64| *s >= 0)
}

/// One page of rows, each paired with its sequence number.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_after: Option<i64>,
}

impl<T> Page<T> {
    /// Builds a page from up to `fetch_limit()` rows of `(seq, item)`.
    pub fn from_rows(mut rows: Vec<(i64, T)>, request: PageRequest) -> Self {
        let more = rows.len() > request.limit as usize;
        rows.truncate(request.limit as usize);
        let next_after = if more {
            rows.last().map(|(seq, _)| *seq)
        } else {
            None
        };
        Self {
            items: rows.into_iter().map(|(_, item)| item).collect(),
            next_after,
        }
    }
}

impl<T: Serialize> Page<T> {
    /// JSON array response; `link_query` is the query string (without cursor) to repeat in
    /// the `Link` header, e.g. `user_id=1&limit=20`.
    pub fn into_response(self, path: &str, link_query: &str) -> Response {
        let mut response = axum::Json(self.items).into_response();
        if let Some(after) = self.next_after {
            announce_next_page(response.headers_mut(), path, link_query, after);
        }
        response
    }
}

/// Names the page after row `after` in `Link` (rel=next) and `X-Next-Cursor`.
pub fn announce_next_page(headers: &mut HeaderMap, path: &str, link_query: &str, after: i64) {
    let cursor = encode_cursor(after);
    let sep = if link_query.is_empty() { "" } else { "&" };
    let link = format!("<{path}?{link_query}{sep}cursor={cursor}>; rel=\"next\"");
    if let (Ok(link), Ok(cursor)) = (HeaderValue::try_from(link), HeaderValue::try_from(cursor)) {
        headers.insert(header::LINK, link);
        headers.insert("x-next-cursor", cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejection() {
        let req = PageRequest::parse(Some(10), Some(&encode_cursor(42))).unwrap();
        assert_eq!(
            req,
            PageRequest {
                limit: 10,
                after: 42
            }
        );
        assert!(PageRequest::parse(None, Some("not-a-cursor")).is_err());
        assert_eq!(
            PageRequest::parse(Some(0), None)
                .unwrap_err()
                .status
                .as_u16(),
            422
        );
        assert_eq!(
            PageRequest::parse(Some(101), None)
                .unwrap_err()
                .status
                .as_u16(),
            422
        );
        assert_eq!(PageRequest::parse(None, None).unwrap().limit, DEFAULT_LIMIT);
    }

    #[test]
    fn page_knows_if_more_rows_exist() {
        let req = PageRequest { limit: 2, after: 0 };
        let page = Page::from_rows(vec![(1, "a"), (2, "b"), (3, "c")], req);
        assert_eq!(page.items, vec!["a", "b"]);
        assert_eq!(page.next_after, Some(2));
        let page = Page::from_rows(vec![(1, "a")], req);
        assert_eq!(page.next_after, None);
    }
}
