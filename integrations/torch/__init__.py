"""torch specifics: process-group (re)initialisation, DDP rebuild, torchrun rendezvous handler."""
