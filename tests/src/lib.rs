//! Real-server test harness for spokelet: etcd, kube-apiserver, controller-manager and an OCI registry on loopback.
#![forbid(unsafe_code)]
