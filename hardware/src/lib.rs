//! Node hardware discovery for spokelet: CPU, memory, NICs, RDMA, GPUs and their topology.
#![forbid(unsafe_code)]
