//! Who is calling and what they may do, settled once per request before its
//! handler runs: a table route's handler gets a [`TableCall`] whose caller
//! is authenticated and allowed the route's action; a job route's handler
//! gets the authenticated [`Principal`] (a job's table is known only once
//! the job is read).

use super::auth::{self, Principal};
use super::{ApiError, ApiRequest, Service};
use crate::model::policy::{Action, Decision};
use crate::model::table::TableId;

/// A request on one table, from a caller allowed the route's action on it.
pub(super) struct TableCall {
    pub principal: Principal,
    pub table: TableId,
}

impl TableCall {
    /// Who asks, as jobs record it.
    pub fn subject(&self) -> &str {
        &self.principal.subject
    }
}

impl Service {
    /// Who is calling: the headers' credentials, or the body's `identity`
    /// (read leniently, before anything else of the body is looked at).
    pub(super) fn caller(&self, http: &ApiRequest) -> Result<Principal, ApiError> {
        let identity = if auth::has_credentials(&http.headers) {
            None
        } else {
            http.identity()
        };
        self.auth.authenticate(&http.headers, identity.as_ref())
    }

    /// The table the path names, its caller authenticated and allowed
    /// `action` on it: a malformed id is a 400, no credentials a 401, no
    /// right a 403, in that order.
    pub(super) fn table_call(
        &self,
        http: &ApiRequest,
        raw_id: &str,
        action: Action,
    ) -> Result<TableCall, ApiError> {
        let table = http.table_id(raw_id)?;
        let principal = self.caller(http)?;
        self.authorize(&principal, &table, action)?;
        Ok(TableCall { principal, table })
    }

    /// 403 (code 15) unless the policy lets `principal` do `action` on `table`.
    pub(super) fn authorize(
        &self,
        principal: &Principal,
        table: &TableId,
        action: Action,
    ) -> Result<(), ApiError> {
        match self.auth.access().decide(&principal.subject, table, action) {
            Decision::Allowed => Ok(()),
            Decision::Denied(reason) => Err(ApiError::permission_denied(reason)),
        }
    }

    /// Whether the caller may also do `action` on the call's table (a right
    /// that widens what a handler does, such as running user functions).
    pub(super) fn may(&self, call: &TableCall, action: Action) -> bool {
        self.authorize(&call.principal, &call.table, action).is_ok()
    }
}
