"""The download worker: leases a batch, downloads it safely, writes a webdataset shard."""
