//! The credentials file: one account a line, `username password`, where
//! the password is plaintext or an Argon2id hash in PHC string form
//! (`$argon2id$v=19$...`, as `chatserver hash-password` prints).
//!
//! Blank lines and lines starting with `#` are skipped. Anything else that
//! is not exactly a valid user name and a valid password is an error that
//! names the file and the line, so a typo cannot silently lock someone out.

use std::path::{Path, PathBuf};

use chatproto::{Accounts, Credential, HashedPassword, Password, Username};

/// The demo accounts in the repository's `credentials.txt`. Their passwords
/// are public, so the server warns when it serves any of them.
pub const DEMO_ACCOUNTS: [(&str, &str); 5] = [
    ("alice", "wonderland"),
    ("bob", "builder"),
    ("carol", "singer"),
    ("dave", "diver"),
    ("admin", "letmein"),
];

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {problem}", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{}: no accounts (every line is blank or a comment)", path.display())]
    Empty { path: PathBuf },
}

/// Reads and checks the file.
pub fn load(path: &Path) -> Result<Accounts, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text)
        .map_err(|(line, problem)| CredentialsError::Malformed {
            path: path.to_owned(),
            line,
            problem,
        })
        .and_then(|accounts| {
            if accounts.is_empty() {
                Err(CredentialsError::Empty {
                    path: path.to_owned(),
                })
            } else {
                Ok(accounts)
            }
        })
}

/// Parses the file's text; an error is (line number, problem).
pub fn parse(text: &str) -> Result<Accounts, (usize, String)> {
    let mut accounts = Accounts::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(name), Some(password), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err((
                number,
                "expected 'username password' (two fields separated by spaces)".to_owned(),
            ));
        };
        let name =
            Username::new(name).map_err(|e| (number, format!("bad user name {name:?}: {e}")))?;
        let credential = if password.starts_with('$') {
            Credential::Hashed(parse_hash(password).map_err(|e| (number, e))?)
        } else {
            Credential::Plain(
                Password::new(password).map_err(|e| (number, format!("bad password: {e}")))?,
            )
        };
        accounts
            .insert_credential(name, credential)
            .map_err(|e| (number, e.to_string()))?;
    }
    Ok(accounts)
}

/// An Argon2id PHC string this build can verify.
fn parse_hash(phc: &str) -> Result<HashedPassword, String> {
    crate::verifier::parse(phc)?;
    HashedPassword::new(phc).map_err(|e| e.to_string())
}

/// A digest of `accounts` that two nodes of a cluster share exactly when
/// they serve the same accounts: BLAKE2b-256, in hex, over every name and
/// its password entry (the Argon2 hash, or the plaintext), in name order.
/// It goes out with each heartbeat on the bus, which carries chat texts in
/// the clear anyway and must be private to the cluster.
pub fn digest(accounts: &Accounts) -> String {
    use blake2::digest::consts::U32;
    use blake2::{Blake2b, Digest};
    let mut entries: Vec<(&str, &str)> = accounts
        .iter()
        .map(|account| {
            let secret = match account.credential() {
                Credential::Plain(password) => password.expose(),
                Credential::Hashed(hash) => hash.as_str(),
            };
            (account.name().as_str(), secret)
        })
        .collect();
    entries.sort_unstable();
    let mut hasher = Blake2b::<U32>::new();
    for (name, secret) in entries {
        // Lengths first: no two lists of entries feed the same bytes.
        for part in [name, secret] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The demo accounts that `accounts` serves with their published password.
pub fn demo_accounts_in(accounts: &Accounts) -> Vec<&'static str> {
    DEMO_ACCOUNTS
        .iter()
        .filter(|(name, password)| {
            let password = Password::new(password).expect("demo passwords are valid");
            accounts
                .iter()
                .any(|a| a.name().as_str() == *name && a.check_password(&password))
        })
        .map(|(name, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accounts_digest_depends_on_the_accounts_not_their_order() {
        let a = parse("alice pw\nbob pw2\n").unwrap();
        let b = parse("bob pw2\nalice pw\n").unwrap();
        let c = parse("alice pw\nbob other\n").unwrap();
        let d = parse("alice pwb\nob pw2\n").unwrap();
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&c));
        assert_ne!(digest(&a), digest(&d), "the same bytes, split otherwise");
        assert_eq!(digest(&a).len(), 64);
    }

    #[test]
    fn parses_accounts_comments_and_blank_lines() {
        let accounts = parse("# demo\n\nalice  pw1\n  bob\tpw2  \r\n").unwrap();
        assert_eq!(accounts.len(), 2);
        assert!(accounts.contains("bob"));
    }

    #[test]
    fn reports_the_line_of_each_kind_of_mistake() {
        assert_eq!(parse("a b\nonlyname\n").unwrap_err().0, 2);
        assert_eq!(parse("a b c\n").unwrap_err().0, 1);
        assert_eq!(parse("\n\nb@d pw\n").unwrap_err().0, 3);
        let (line, problem) = parse("a x\na y\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(problem.contains("duplicate"), "{problem}");
    }

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$bTe/GOEpZiqKb5wMWhAwQm2vdT0cYzb/vCA7k8CXRpA";

    #[test]
    fn takes_argon2id_hashes_beside_plaintext() {
        let accounts = parse(&format!(
            "alice {HASH}
bob plain
"
        ))
        .unwrap();
        assert_eq!(accounts.plaintext_count(), 1);
        let alice = accounts.iter().next().unwrap();
        assert!(matches!(alice.credential(), Credential::Hashed(h) if h.as_str() == HASH));
    }

    #[test]
    fn refuses_hashes_it_cannot_verify() {
        for (line, expected) in [
            ("a $argon2id$v=19$m=19456", "no hash part"),
            ("a $2b$12$abcdefghijklmnopqrstuv", "bad password hash"),
            (
                "a $argon2i$v=19$m=19456,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$bTe/GOEpZiqKb5wMWhAwQm2vdT0cYzb/vCA7k8CXRpA",
                "only argon2id",
            ),
        ] {
            let (number, problem) = parse(line).unwrap_err();
            assert_eq!(number, 1);
            assert!(problem.contains(expected), "{line}: {problem}");
        }
    }

    #[test]
    fn the_shipped_demo_file_holds_exactly_the_demo_accounts() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../credentials.txt");
        let accounts = load(&path).unwrap();
        assert_eq!(accounts.len(), DEMO_ACCOUNTS.len());
        assert_eq!(demo_accounts_in(&accounts).len(), DEMO_ACCOUNTS.len());
    }
}
