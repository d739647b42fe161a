//! The `multipart/mixed` answers of the federation media endpoints
//! (`/_matrix/federation/v1/media/download` and `/thumbnail`): a first
//! part of JSON metadata (`{}` today), then the content itself, or a
//! `Location` header where it may be fetched instead.

/// The content part of a media answer.
#[derive(Debug, PartialEq, Eq)]
pub enum MediaPart {
    /// The bytes, with the part's `Content-Type` and `Content-Disposition`.
    Bytes {
        content_type: Option<String>,
        content_disposition: Option<String>,
        body: Vec<u8>,
    },
    /// Fetch the content from this URL (unauthenticated).
    Location(String),
}

/// Why an answer is not a media answer.
#[derive(Debug, PartialEq, Eq)]
pub struct MultipartError(pub &'static str);

impl std::fmt::Display for MultipartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for MultipartError {}

/// The boundary named by a `multipart/mixed` content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let essence = params.next()?.trim();
    if !essence.eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty() && value.len() <= 70).then(|| value.to_owned())
    })
}

/// The opening of an answer up to its content: the metadata part and the
/// content part's headers. The content follows, then [`closing`].
pub fn opening(boundary: &str, content_type: &str, content_disposition: Option<&str>) -> Vec<u8> {
    let mut text = format!(
        "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n\
         Content-Type: {content_type}\r\n"
    );
    if let Some(disposition) = content_disposition {
        text.push_str(&format!("Content-Disposition: {disposition}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// The end of an answer, after its content.
pub fn closing(boundary: &str) -> Vec<u8> {
    format!("\r\n--{boundary}--\r\n").into_bytes()
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|window| window == needle)
        .map(|at| at + from)
}

/// One part: its headers (lower-cased names) and its body.
type Part<'a> = (Vec<(String, String)>, &'a [u8]);

fn parts<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, MultipartError> {
    let delimiter = format!("--{boundary}").into_bytes();
    let mut at = find(body, &delimiter, 0).ok_or(MultipartError("no boundary"))?;
    let mut parts = Vec::new();
    loop {
        at += delimiter.len();
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        // The rest of the boundary line.
        let line_end = find(body, b"\r\n", at).ok_or(MultipartError("a cut boundary line"))?;
        let headers_start = line_end + 2;
        let (headers_end, body_start) = if body[headers_start..].starts_with(b"\r\n") {
            (headers_start, headers_start + 2)
        } else {
            let end = find(body, b"\r\n\r\n", headers_start)
                .ok_or(MultipartError("part headers without an end"))?;
            (end, end + 4)
        };
        let headers = std::str::from_utf8(&body[headers_start..headers_end])
            .map_err(|_| MultipartError("part headers that are not text"))?
            .split("\r\n")
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let mut next_delimiter = b"\r\n".to_vec();
        next_delimiter.extend_from_slice(&delimiter);
        let end = find(body, &next_delimiter, body_start)
            .ok_or(MultipartError("a part without an end"))?;
        parts.push((headers, &body[body_start..end]));
        at = end + 2;
    }
}

/// Reads a media answer: its metadata must be a JSON object; its content
/// part is the media or where to fetch it.
pub fn parse(body: &[u8], boundary: &str) -> Result<MediaPart, MultipartError> {
    let parts = parts(body, boundary)?;
    let [(_, metadata), (headers, content)] = parts.as_slice() else {
        return Err(MultipartError("not two parts"));
    };
    let metadata: serde_json::Value =
        serde_json::from_slice(metadata).map_err(|_| MultipartError("metadata is not JSON"))?;
    if !metadata.is_object() {
        return Err(MultipartError("metadata is not a JSON object"));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.clone())
    };
    if let Some(location) = header("location") {
        return Ok(MediaPart::Location(location));
    }
    Ok(MediaPart::Bytes {
        content_type: header("content-type"),
        content_disposition: header("content-disposition"),
        body: content.to_vec(),
    })
}

/// The file name a `Content-Disposition` value gives (`filename*=utf-8''`
/// percent-encoded, or a plain `filename=`).
pub fn filename_of(disposition: &str) -> Option<String> {
    let params: Vec<(String, String)> = disposition
        .split(';')
        .skip(1)
        .filter_map(|param| {
            let (name, value) = param.split_once('=')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect();
    let encoded = params.iter().find(|(name, _)| name == "filename*");
    if let Some((_, value)) = encoded {
        let (charset, rest) = value.split_once('\'')?;
        let (_, text) = rest.split_once('\'')?;
        if !charset.eq_ignore_ascii_case("utf-8") {
            return None;
        }
        return percent_decode(text);
    }
    params
        .iter()
        .find(|(name, _)| name == "filename")
        .map(|(_, value)| value.trim_matches('"').to_owned())
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_back_byte_for_byte() {
        let content = b"\x89PNG\r\n--not a boundary\r\n\x00\xff".to_vec();
        let mut body = opening("b0und", "image/png", Some("inline; filename=\"a.png\""));
        body.extend_from_slice(&content);
        body.extend_from_slice(&closing("b0und"));
        let boundary = boundary_of("multipart/mixed; boundary=\"b0und\"").unwrap();
        assert_eq!(
            parse(&body, &boundary).unwrap(),
            MediaPart::Bytes {
                content_type: Some("image/png".to_owned()),
                content_disposition: Some("inline; filename=\"a.png\"".to_owned()),
                body: content,
            }
        );
    }

    #[test]
    fn a_location_part_and_bad_answers() {
        let body = b"--x\r\nContent-Type: application/json\r\n\r\n{}\r\n--x\r\n\
                     Location: https://cdn.example/m\r\n\r\n\r\n--x--\r\n";
        assert_eq!(
            parse(body, "x").unwrap(),
            MediaPart::Location("https://cdn.example/m".to_owned())
        );
        assert!(parse(b"--x\r\n\r\nnot json\r\n--x\r\n\r\nbody\r\n--x--", "x").is_err());
        assert!(parse(b"--x\r\n\r\n{}\r\n--x--", "x").is_err());
        assert!(parse(b"no boundary here", "x").is_err());
        assert!(parse(b"--x\r\n\r\n{}\r\n--x\r\n\r\ncut", "x").is_err());
        assert_eq!(boundary_of("application/json"), None);
        assert_eq!(boundary_of("multipart/mixed"), None);
    }

    #[test]
    fn file_names_from_content_disposition() {
        assert_eq!(
            filename_of("inline; filename*=utf-8''caf%C3%A9%20au%20lait.png").as_deref(),
            Some("café au lait.png")
        );
        assert_eq!(
            filename_of("attachment; filename=\"plain.txt\"").as_deref(),
            Some("plain.txt")
        );
        assert_eq!(filename_of("inline"), None);
    }
}
