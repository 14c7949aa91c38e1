//! `spokelet inventory`: discover this node's hardware and print it.
