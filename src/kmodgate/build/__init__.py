"""Building module sources against kernel builds: dkms.conf semantics, the sandbox, kbuild."""
