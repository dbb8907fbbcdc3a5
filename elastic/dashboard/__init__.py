"""`python -m elastic.dashboard`: one page on 127.0.0.1 showing the jobs of an etcd (members, a
world-size timeline with the cause of every change), and with a shared pool its queues, pending
reasons, allocation and endpoints; it only reads. `views` (pure JSON builders), `sources` (the
job client, the pool's client, Ray), `server` (the HTTP API), `page` (the static page)."""
