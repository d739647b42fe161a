//! `m.room.server_acl`: which servers may take part in a room. The rules,
//! in the spec's order: an IP literal is refused unless `allow_ip_literals`
//! (default true); then a server matching a `deny` glob is refused; then a
//! server matching an `allow` glob is allowed; anything else is refused.
//! Globs match the host without its port (`*` any run of characters, `?`
//! one character), without regard to case, as host names have none.

use ruma::ServerName;
use serde_json::Value;

/// Whether the ACL `content` lets `server` take part in the room. A room
/// without an ACL event allows everyone; the caller checks that.
pub fn allows(content: &Value, server: &ServerName) -> bool {
    let allow_ip_literals = content
        .get("allow_ip_literals")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if !allow_ip_literals && server.is_ip_literal() {
        return false;
    }
    let host = server.host().to_ascii_lowercase();
    let matches_any = |field: &str| {
        content
            .get(field)
            .and_then(Value::as_array)
            .is_some_and(|globs| {
                globs
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|glob| glob_matches(&glob.to_ascii_lowercase(), &host))
            })
    };
    !matches_any("deny") && matches_any("allow")
}

/// Glob matching with `*` and `?`, iterative with one backtrack point, so
/// that a hostile pattern costs at most length × length steps.
fn glob_matches(glob: &str, text: &str) -> bool {
    let (glob, text) = (glob.as_bytes(), text.as_bytes());
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if g < glob.len() && (glob[g] == b'?' || glob[g] == text[t]) {
            g += 1;
            t += 1;
        } else if g < glob.len() && glob[g] == b'*' {
            star = Some((g, t));
            g += 1;
        } else if let Some((star_g, star_t)) = star {
            g = star_g + 1;
            t = star_t + 1;
            star = Some((star_g, star_t + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(content: Value, server: &str, expected: bool) {
        let name = <&ServerName>::try_from(server).unwrap();
        assert_eq!(allows(&content, name), expected, "{server} under {content}");
    }

    #[test]
    fn globs() {
        for (glob, text, expected) in [
            ("*", "", true),
            ("*", "anything.example", true),
            ("*.example", "a.example", true),
            ("*.example", "example", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a*b*c", "a-x-b-y-c", true),
            ("a*b*c", "a-x-c", false),
            ("**", "x", true),
            ("exact.org", "exact.org", true),
            ("exact.org", "exact.org.evil", false),
        ] {
            assert_eq!(glob_matches(glob, text), expected, "{glob} ~ {text}");
        }
    }

    #[test]
    fn the_rules_in_order() {
        let acl = json!({ "allow": ["*"], "deny": ["*.evil.example"], "allow_ip_literals": false });
        check(acl.clone(), "good.example", true);
        check(acl.clone(), "good.example:8448", true);
        check(acl.clone(), "bad.evil.example", false);
        check(acl.clone(), "BAD.Evil.Example:443", false);
        check(acl.clone(), "127.0.0.2:8448", false);
        check(acl, "[::1]:8448", false);

        let only = json!({ "allow": ["trusted.example", "*.trusted.example"] });
        check(only.clone(), "trusted.example", true);
        check(only.clone(), "sub.trusted.example", true);
        check(only.clone(), "other.example", false);
        // IP literals are allowed by default, but must still match `allow`.
        check(only, "127.0.0.2", false);
        check(json!({ "allow": ["*"] }), "127.0.0.2:8448", true);

        // No allow list allows nobody; malformed entries are ignored.
        check(json!({}), "any.example", false);
        check(json!({ "allow": "*", "deny": [5] }), "any.example", false);
        check(
            json!({ "allow": ["*", 5], "deny": [null] }),
            "any.example",
            true,
        );
    }
}
