//! The operator's side, on its own listener (`[admin] listen`), never the
//! public one: the console page, the admin API and `/metrics`.
