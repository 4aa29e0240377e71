#!/usr/bin/env python3
"""A server that joins a reuseport group by itself, with the standard library only.

    register_and_serve.py CONTROL_SOCKET IP:PORT GENERATION [--activate]

It registers an SO_REUSEPORT listener with reuseport-agent (docs/protocol.md: length-prefixed
JSON over a Unix socket, the listener passed as SCM_RIGHTS) and answers `req N` with
`gen GENERATION N+1`. When its generation drains, it closes the listener (what is queued
there moves to the active generation) and exits 0.
"""
import json
import selectors
import socket
import struct
import sys

MORE = 0x8000_0000  # length-word bit: another frame of the same message follows


def send(ctl, message, fds=()):
    body = json.dumps(message).encode()
    socket.send_fds(ctl, [struct.pack(">I", len(body)) + body], list(fds))


def read(ctl, n):
    data = ctl.recv(n, socket.MSG_WAITALL) if n else b""
    if len(data) < n:
        sys.exit("reuseport-agent closed the control connection")
    return data


def receive(ctl):
    body = b""
    while True:
        (word,) = struct.unpack(">I", read(ctl, 4))
        body += read(ctl, word & ~MORE)
        if not word & MORE:
            return json.loads(body)


def main():
    control, address, generation = sys.argv[1], sys.argv[2], int(sys.argv[3])
    host, port = address.rsplit(":", 1)
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host.strip("[]"), int(port)))
    listener.listen(4096)

    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.connect(control)
    send(ctl, {"v": 1, "op": "register", "group": f"tcp://{address}",
               "generation": generation, "name": "python",
               "activate": "--activate" in sys.argv}, [listener.fileno()])
    reply = receive(ctl)
    if reply["type"] != "registered":
        sys.exit(f"registration refused: {reply.get('message', reply)}")
    state = reply["state"]
    print(f"registered in {reply['group']} as generation {generation}: {state}", flush=True)

    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(ctl, selectors.EVENT_READ)
    while state != "draining":
        for key, _ in events.select():
            if key.fileobj is ctl:  # the agent pushes every change of our state
                state = receive(ctl).get("state", state)
                print(f"state: {state}", flush=True)
                continue
            conn, _ = listener.accept()
            with conn, conn.makefile("rw") as stream:
                words = stream.readline().split()
                if len(words) == 2 and words[0] == "req":
                    stream.write(f"gen {generation} {int(words[1]) + 1}\n")
    listener.close()  # queued connections migrate to the active generation


if __name__ == "__main__":
    main()
