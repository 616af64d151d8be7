"""HTTP mode: a per-request HTTP/1.1 reverse proxy on lb's own epoll loop.

- ``messages``: request and response heads, the hop-by-hop rules, what goes to the peer;
- ``answers``: the answers lb makes itself (400, 404, 408, 414, 431, 502, 503, 504);
- ``proxy``: a client connection (``HTTPSession``) and each request's ``Exchange``;
- ``upstream``: keep-alive connections to peers (``UpstreamPool``);
- ``tunnel``: an upgraded connection (WebSocket) carried by the pump;
- ``listener``: the listener that accepts HTTP clients, routes, counts and logs requests.
"""
