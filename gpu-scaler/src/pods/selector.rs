//! Kubernetes label selectors in their string form, equality- and set-based:
//! `app=vllm,tier in (gpu,edge),!canary`, `a==b`, `a!=b`, `k notin (x,y)`, `k`.
//!
//! Semantics follow `k8s.io/apimachinery/pkg/labels`: requirements are ANDed;
//! `!=` and `notin` also match pods that lack the key.

use std::{collections::BTreeMap, fmt};

/// What a selector string could not be parsed as, with the character column
/// (1-based) where parsing stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct Error {
    pub column: usize,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest selector accepted, in bytes. A Deployment's own selector rendered as
/// text is far shorter; the limit keeps parsing cost and memory independent of
/// what a caller sends (issue 13: a 3.9 MiB selector took the daemon to 401 MiB).
pub const MAX_BYTES: usize = 4096;
/// Most requirements in one selector, for the same reason.
pub const MAX_REQUIREMENTS: usize = 64;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    /// `key`
    Exists(String),
    /// `!key`
    DoesNotExist(String),
    /// `key=value` or `key==value`
    Equals(String, String),
    /// `key!=value`
    NotEquals(String, String),
    /// `key in (a,b)`
    In(String, Vec<String>),
    /// `key notin (a,b)`
    NotIn(String, Vec<String>),
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Self::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exists(k) => write!(f, "{k}"),
            Self::DoesNotExist(k) => write!(f, "!{k}"),
            Self::Equals(k, v) => write!(f, "{k}={v}"),
            Self::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Self::In(k, vs) => write!(f, "{k} in ({})", vs.join(",")),
            Self::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(",")),
        }
    }
}

/// A parsed selector: the AND of its requirements, kept in canonical order
/// (sorted, values sorted and deduplicated) so equal selectors compare and print
/// equal however they were written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses the string form. An empty string is an error: a selector that
    /// matches every pod is never what a ScaledObject means.
    pub fn parse(input: &str) -> Result<Self> {
        if input.len() > MAX_BYTES {
            return Err(Error {
                column: MAX_BYTES + 1,
                message: format!(
                    "the selector has {} bytes; at most {MAX_BYTES} are accepted",
                    input.len()
                ),
            });
        }
        let mut parser = Parser::new(input);
        let mut requirements = Vec::new();
        if parser.peek().is_none() {
            return Err(
                parser.error_here("the selector is empty; expected a requirement such as app=vllm")
            );
        }
        loop {
            let (column, requirement) = (parser.column(), parser.requirement()?);
            if requirements.len() == MAX_REQUIREMENTS {
                return Err(Error {
                    column,
                    message: format!(
                        "more than {MAX_REQUIREMENTS} requirements; at most {MAX_REQUIREMENTS} are accepted"
                    ),
                });
            }
            requirements.push(requirement);
            match parser.next() {
                None => break,
                Some((_, Token::Comma)) => {}
                Some((col, tok)) => {
                    return Err(Error {
                        column: col,
                        message: format!("expected ',' or the end of the selector, found {tok}"),
                    });
                }
            }
        }
        requirements.sort();
        requirements.dedup();
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Selector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Comma,
    Open,
    Close,
    /// `=`
    Eq,
    /// `==`
    EqEq,
    /// `!=`
    NotEq,
    /// `!`
    Bang,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Word(w) => write!(f, "'{w}'"),
            Self::Comma => f.write_str("','"),
            Self::Open => f.write_str("'('"),
            Self::Close => f.write_str("')'"),
            Self::Eq => f.write_str("'='"),
            Self::EqEq => f.write_str("'=='"),
            Self::NotEq => f.write_str("'!='"),
            Self::Bang => f.write_str("'!'"),
        }
    }
}

/// Tokens with their 1-based character columns, plus the column just past the end.
struct Parser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    end_column: usize,
}

impl Parser {
    fn new(input: &str) -> Self {
        let chars: Vec<char> = input.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let col = i + 1;
            match c {
                c if c.is_whitespace() => i += 1,
                ',' => {
                    tokens.push((col, Token::Comma));
                    i += 1;
                }
                '(' => {
                    tokens.push((col, Token::Open));
                    i += 1;
                }
                ')' => {
                    tokens.push((col, Token::Close));
                    i += 1;
                }
                '=' if chars.get(i + 1) == Some(&'=') => {
                    tokens.push((col, Token::EqEq));
                    i += 2;
                }
                '=' => {
                    tokens.push((col, Token::Eq));
                    i += 1;
                }
                '!' if chars.get(i + 1) == Some(&'=') => {
                    tokens.push((col, Token::NotEq));
                    i += 2;
                }
                '!' => {
                    tokens.push((col, Token::Bang));
                    i += 1;
                }
                _ => {
                    let start = i;
                    while i < chars.len()
                        && !chars[i].is_whitespace()
                        && !matches!(chars[i], ',' | '(' | ')' | '=' | '!')
                    {
                        i += 1;
                    }
                    tokens.push((col, Token::Word(chars[start..i].iter().collect())));
                }
            }
        }
        Self {
            tokens,
            pos: 0,
            end_column: chars.len() + 1,
        }
    }

    fn peek(&self) -> Option<&(usize, Token)> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<(usize, Token)> {
        let t = self.tokens.get(self.pos).cloned();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn column(&self) -> usize {
        self.peek().map_or(self.end_column, |(c, _)| *c)
    }

    fn error_here(&self, message: impl Into<String>) -> Error {
        Error {
            column: self.column(),
            message: message.into(),
        }
    }

    fn found(&self) -> String {
        self.peek().map_or_else(
            || "the end of the selector".to_owned(),
            |(_, t)| t.to_string(),
        )
    }

    fn requirement(&mut self) -> Result<Requirement> {
        if matches!(self.peek(), Some((_, Token::Bang))) {
            self.next();
            let key = self.key()?;
            return Ok(Requirement::DoesNotExist(key));
        }
        let key = self.key()?;
        let op_col = self.column();
        match self.peek().map(|(_, t)| t.clone()) {
            None | Some(Token::Comma) => Ok(Requirement::Exists(key)),
            Some(Token::Eq) | Some(Token::EqEq) => {
                self.next();
                Ok(Requirement::Equals(key, self.single_value()?))
            }
            Some(Token::NotEq) => {
                self.next();
                Ok(Requirement::NotEquals(key, self.single_value()?))
            }
            Some(Token::Word(w)) if w == "in" || w == "notin" => {
                self.next();
                let values = self.value_set(&w)?;
                Ok(if w == "in" {
                    Requirement::In(key, values)
                } else {
                    Requirement::NotIn(key, values)
                })
            }
            Some(t) => Err(Error {
                column: op_col,
                message: format!(
                    "expected an operator after key '{key}' (=, ==, !=, in, notin) or ',', found {t}"
                ),
            }),
        }
    }

    fn key(&mut self) -> Result<String> {
        let col = self.column();
        match self.peek() {
            Some((_, Token::Word(w))) => {
                let w = w.clone();
                validate_key(&w).map_err(|message| Error {
                    column: col,
                    message,
                })?;
                self.next();
                Ok(w)
            }
            _ => Err(self.error_here(format!("expected a label key, found {}", self.found()))),
        }
    }

    /// The value after `=`, `==` or `!=`; may be empty (`tier=`), as in Kubernetes.
    fn single_value(&mut self) -> Result<String> {
        let col = self.column();
        match self.peek() {
            None | Some((_, Token::Comma)) => Ok(String::new()),
            Some((_, Token::Word(w))) => {
                let w = w.clone();
                validate_value(&w).map_err(|message| Error {
                    column: col,
                    message,
                })?;
                self.next();
                Ok(w)
            }
            Some(_) => {
                Err(self.error_here(format!("expected a label value, found {}", self.found())))
            }
        }
    }

    fn value_set(&mut self, op: &str) -> Result<Vec<String>> {
        if !matches!(self.peek(), Some((_, Token::Open))) {
            return Err(
                self.error_here(format!("expected '(' after '{op}', found {}", self.found()))
            );
        }
        self.next();
        let mut values = Vec::new();
        loop {
            let col = self.column();
            match self.next() {
                Some((_, Token::Word(w))) => {
                    validate_value(&w).map_err(|message| Error {
                        column: col,
                        message,
                    })?;
                    values.push(w);
                }
                Some((_, Token::Close)) if values.is_empty() => {
                    return Err(Error {
                        column: col,
                        message: format!(
                            "the value set of '{op}' is empty; list at least one value"
                        ),
                    });
                }
                Some((_, t)) => {
                    return Err(Error {
                        column: col,
                        message: format!("expected a label value in the set, found {t}"),
                    });
                }
                None => {
                    return Err(Error {
                        column: col,
                        message: "expected a label value in the set, found the end of the selector"
                            .into(),
                    });
                }
            }
            let col = self.column();
            match self.next() {
                Some((_, Token::Comma)) => {}
                Some((_, Token::Close)) => break,
                Some((_, t)) => {
                    return Err(Error {
                        column: col,
                        message: format!("expected ',' or ')' in the value set, found {t}"),
                    });
                }
                None => {
                    return Err(Error {
                        column: col,
                        message: "unclosed value set: expected ')'".into(),
                    });
                }
            }
        }
        values.sort();
        values.dedup();
        Ok(values)
    }
}

/// A label name part: at most 63 characters, alphanumeric at both ends,
/// `-`, `_`, `.` inside.
fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS-1123 subdomain (the optional key prefix).
fn valid_prefix(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

fn validate_key(key: &str) -> std::result::Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !valid_prefix(p)
    {
        return Err(format!(
            "invalid label key '{key}': the prefix '{p}' must be a lowercase DNS subdomain (e.g. example.com)"
        ));
    }
    if !valid_name(name) {
        return Err(format!(
            "invalid label key '{key}': the name must be 1-63 characters, start and end with a letter \
             or digit, with only '-', '_' or '.' in between"
        ));
    }
    Ok(())
}

fn validate_value(value: &str) -> std::result::Result<(), String> {
    if value.is_empty() || valid_name(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value '{value}': at most 63 characters, starting and ending with a letter \
             or digit, with only '-', '_' or '.' in between"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn err(s: &str) -> Error {
        match Selector::parse(s) {
            Ok(v) => panic!("{s:?} should not parse, got {v}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_the_issue_example() {
        let s = sel("app=vllm,tier in (gpu,edge),!canary");
        assert_eq!(
            s.requirements,
            &[
                Requirement::DoesNotExist("canary".into()),
                Requirement::Equals("app".into(), "vllm".into()),
                Requirement::In("tier".into(), vec!["edge".into(), "gpu".into()]),
            ]
        );
        assert!(s.matches(&labels(&[("app", "vllm"), ("tier", "gpu")])));
        assert!(s.matches(&labels(&[("app", "vllm"), ("tier", "edge"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "vllm"), ("tier", "cpu")])));
        assert!(!s.matches(&labels(&[("app", "vllm"), ("tier", "gpu"), ("canary", "")])));
        assert!(!s.matches(&labels(&[("app", "vllm")])));
    }

    #[test]
    fn every_operator() {
        let l = labels(&[("a", "b"), ("env", "prod")]);
        assert!(sel("a==b").matches(&l));
        assert!(sel("a = b").matches(&l));
        assert!(!sel("a!=b").matches(&l));
        assert!(sel("a!=c").matches(&l));
        assert!(sel("missing!=x").matches(&l), "!= matches an absent key");
        assert!(sel("env notin (dev,test)").matches(&l));
        assert!(!sel("env notin (prod)").matches(&l));
        assert!(
            sel("missing notin (x)").matches(&l),
            "notin matches an absent key"
        );
        assert!(sel("env").matches(&l));
        assert!(!sel("missing").matches(&l));
        assert!(sel("!missing").matches(&l));
        assert!(!sel("!env").matches(&l));
        assert!(!sel("missing in (x)").matches(&l));
        assert!(sel("example.com/team=gpu").matches(&labels(&[("example.com/team", "gpu")])));
        assert!(sel("tier=").matches(&labels(&[("tier", "")])));
        assert!(!sel("tier=").matches(&labels(&[("tier", "x")])));
    }

    #[test]
    fn canonical_form_ignores_order_and_spacing() {
        assert_eq!(sel("b=2,a=1"), sel(" a = 1 , b == 2 "));
        assert_eq!(sel("t in (y,x,x)").to_string(), "t in (x,y)");
        assert_eq!(
            sel("app=vllm,tier in (gpu,edge),!canary").to_string(),
            "!canary,app=vllm,tier in (edge,gpu)"
        );
        // The printed form parses back to the same selector.
        let s = sel("x notin (b,a),k,!n,q!=r");
        assert_eq!(sel(&s.to_string()), s);
    }

    #[test]
    fn errors_are_precise() {
        let e = err("");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("empty"), "{e}");
        let e = err("app=vllm,");
        assert_eq!(e.column, 10);
        assert!(e.message.contains("expected a label key"), "{e}");
        let e = err("tier in gpu");
        assert_eq!(e.column, 9);
        assert!(e.message.contains("expected '(' after 'in'"), "{e}");
        let e = err("tier in (gpu,edge");
        assert!(e.message.contains("unclosed"), "{e}");
        let e = err("tier in ()");
        assert_eq!(e.column, 10);
        assert!(e.message.contains("empty"), "{e}");
        let e = err("app vllm");
        assert_eq!(e.column, 5);
        assert!(
            e.message.contains("expected an operator after key 'app'"),
            "{e}"
        );
        let e = err("app=vllm tier=gpu");
        assert_eq!(e.column, 10);
        assert!(e.message.contains("expected ',' or the end"), "{e}");
        let e = err("-bad=x");
        assert!(e.message.contains("invalid label key '-bad'"), "{e}");
        let e = err("Example.com/a=b");
        assert!(e.message.contains("prefix"), "{e}");
        let e = err("a=b@d");
        assert!(e.message.contains("invalid label value 'b@d'"), "{e}");
        let e = err(&format!("a={}", "x".repeat(64)));
        assert!(e.message.contains("invalid label value"), "{e}");
        let e = err("a=(b)");
        assert!(
            e.message.contains("expected a label value, found '('"),
            "{e}"
        );
        let e = err("!");
        assert!(
            e.message.contains("expected a label key, found the end"),
            "{e}"
        );
        let e = err("a in (b c)");
        assert!(e.message.contains("expected ',' or ')'"), "{e}");
        assert_eq!(e.to_string(), format!("column {}: {}", e.column, e.message));
    }

    #[test]
    fn size_and_requirement_limits() {
        // The issue's 3.9 MiB `a,a,a,...`: refused on its length, before tokenizing.
        let huge = "a,".repeat(2_000_000);
        let e = err(&huge);
        assert!(e.message.contains("at most 4096"), "{e}");
        assert!(
            e.to_string().len() < 200,
            "the message does not quote the input"
        );
        // Exactly 4096 bytes: `k in (v,v,...,v)` with 2,045 values.
        let at = format!("k in ({})", vec!["v"; 2045].join(","));
        assert_eq!(at.len(), MAX_BYTES);
        assert_eq!(sel(&at).requirements.len(), 1);
        let over = format!("k in ({})", vec!["v"; 2046].join(","));
        assert!(err(&over).message.contains("4098 bytes"));

        let reqs = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(sel(&reqs(MAX_REQUIREMENTS)).requirements.len(), 64);
        let e = err(&reqs(MAX_REQUIREMENTS + 1));
        assert!(e.message.contains("more than 64 requirements"), "{e}");
        assert_eq!(
            e.column,
            reqs(MAX_REQUIREMENTS).len() + 2,
            "points at the 65th"
        );
    }
}
