"""Public URLs for a server on this machine, so a phone or a laptop can reach the web UI.

One module per provider: :mod:`~fastsd.tunnel.cloudflared` (a quick tunnel, no account),
:mod:`~fastsd.tunnel.ngrok` (through pyngrok, with the user's authtoken),
:mod:`~fastsd.tunnel.gradio_share` (Gradio's share servers),
:mod:`~fastsd.tunnel.localtunnel` and :mod:`~fastsd.tunnel.colab_proxy` (Colab's own port
proxy: a URL that opens only in the browser that runs the notebook).

* :func:`fastsd.tunnel.auto.open_tunnel` opens the one asked for, or with ``"auto"`` tries
  them in :data:`~fastsd.tunnel.auto.AUTO_ORDER` until one gives a URL that answers a health
  check *through the tunnel*. Every attempt is bounded in time and every failure is kept
  with its reason, so the user sees why each provider was passed over.
* :mod:`~fastsd.tunnel.health`: that check. A tunnel makes the server public, so none is
  opened without a password, and the check proves through the tunnel that the server
  refuses a request without one.
* :class:`fastsd.tunnel.keeper.Keeper` checks an open tunnel now and then and opens a new
  one (with a new URL) when it stops answering; the server behind it keeps running.
* :mod:`~fastsd.tunnel.tools`: the binaries (cloudflared, ngrok), downloaded once into the
  workspace's ``tools/`` folder at a pinned version, and copied to local disk to run.
* :mod:`~fastsd.tunnel.base`: what every provider shares (Tunnel, Attempt, Provider);
  :mod:`~fastsd.tunnel.relay`: TCP relaying; :mod:`~fastsd.tunnel.link`: the link and QR
  code shown in a cell.
"""
