//! Accounts: who may log in, and with which password (kept in plaintext or
//! as a hash).
//!
//! The table is fixed when the server core is built (the binary reads it
//! from its credentials file). Each account gets a small integer
//! `UserId`, so that the hot paths (routing, blocking, presence) compare
//! and index by integer instead of hashing names.

use std::collections::HashMap;

use crate::password::{HashedPassword, Password};
use crate::username::Username;

/// The accounts a server knows.
///
/// ```
/// use chatproto::Accounts;
///
/// let mut accounts = Accounts::new();
/// accounts.insert("alice".parse().unwrap(), "wonderland".parse().unwrap()).unwrap();
/// assert!(accounts.insert("alice".parse().unwrap(), "again".parse().unwrap()).is_err());
/// assert_eq!(accounts.len(), 1);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    entries: Vec<Account>,
    by_name: HashMap<Username, UserId>,
    /// A hash to check logins for unknown names against, so that they cost
    /// what a wrong password costs (the first hashed account's).
    decoy: Option<HashedPassword>,
}

/// One account.
#[derive(Clone, Debug)]
pub struct Account {
    name: Username,
    credential: Credential,
}

/// How an account's password is kept.
#[derive(Clone, Debug)]
pub enum Credential {
    /// In plaintext: checked in constant time by the core.
    Plain(Password),
    /// As a hash: checked by the driver, off its event loop.
    Hashed(HashedPassword),
}

/// An account's index in its [`Accounts`] table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct UserId(u32);

/// The same user name was given twice.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("duplicate account {0}")]
pub struct DuplicateAccount(pub Username);

impl Accounts {
    /// An empty table.
    pub fn new() -> Self {
        Accounts::default()
    }

    /// Adds an account with a plaintext password; a name may appear once.
    pub fn insert(&mut self, name: Username, password: Password) -> Result<(), DuplicateAccount> {
        self.insert_credential(name, Credential::Plain(password))
    }

    /// Adds an account with a password hash; a name may appear once.
    pub fn insert_hashed(
        &mut self,
        name: Username,
        hash: HashedPassword,
    ) -> Result<(), DuplicateAccount> {
        self.insert_credential(name, Credential::Hashed(hash))
    }

    /// Adds an account; a name may appear once.
    pub fn insert_credential(
        &mut self,
        name: Username,
        credential: Credential,
    ) -> Result<(), DuplicateAccount> {
        if self.by_name.contains_key(&name) {
            return Err(DuplicateAccount(name));
        }
        if let (None, Credential::Hashed(hash)) = (&self.decoy, &credential) {
            self.decoy = Some(hash.clone());
        }
        let id = UserId(u32::try_from(self.entries.len()).expect("fewer than 2^32 accounts"));
        self.by_name.insert(name.clone(), id);
        self.entries.push(Account { name, credential });
        Ok(())
    }

    /// How many accounts keep their password in plaintext.
    pub fn plaintext_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|a| matches!(a.credential, Credential::Plain(_)))
            .count()
    }

    pub(crate) fn decoy(&self) -> Option<&HashedPassword> {
        self.decoy.as_ref()
    }

    /// How many accounts there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `name` has an account.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The accounts, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = &Account> {
        self.entries.iter()
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = UserId> {
        (0..self.entries.len() as u32).map(UserId)
    }

    pub(crate) fn id(&self, name: &str) -> Option<UserId> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn get(&self, id: UserId) -> &Account {
        &self.entries[id.index()]
    }

    pub(crate) fn name(&self, id: UserId) -> &Username {
        &self.entries[id.index()].name
    }
}

impl Account {
    /// The user name.
    pub fn name(&self) -> &Username {
        &self.name
    }

    /// How the password is kept.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// Whether `password` is this account's plaintext password (always
    /// false for a hashed one, which only the driver can check).
    pub fn check_password(&self, password: &Password) -> bool {
        match &self.credential {
            Credential::Plain(p) => p.matches(password),
            Credential::Hashed(_) => false,
        }
    }
}

impl UserId {
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// A table with one slot per account, indexed by [`UserId`].
#[derive(Clone, Debug)]
pub(crate) struct PerUser<T>(Vec<T>);

impl<T: Default> PerUser<T> {
    pub(crate) fn new(accounts: &Accounts) -> Self {
        PerUser((0..accounts.len()).map(|_| T::default()).collect())
    }
}

impl<T> std::ops::Index<UserId> for PerUser<T> {
    type Output = T;

    fn index(&self, id: UserId) -> &T {
        &self.0[id.index()]
    }
}

impl<T> std::ops::IndexMut<UserId> for PerUser<T> {
    fn index_mut(&mut self, id: UserId) -> &mut T {
        &mut self.0[id.index()]
    }
}
