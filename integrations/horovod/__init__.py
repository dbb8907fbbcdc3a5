"""Horovod workers under the elastic launcher: gloo rendezvous, elastic resets, host discovery."""
