"""Job membership on etcd v3: registration under leases, leader election, fenced rounds."""
