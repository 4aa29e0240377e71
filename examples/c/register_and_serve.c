/* A server that joins a reuseport group by itself, in plain C (see docs/protocol.md).
 *   cc -o register_and_serve register_and_serve.c
 *   ./register_and_serve CONTROL_SOCKET IPV4 PORT GENERATION [--activate]
 * Registers an SO_REUSEPORT listener (passed as SCM_RIGHTS), answers `req N` with
 * `gen GENERATION N+1`, and when its generation drains closes the listener (what is queued
 * there moves to the active generation) and exits 0. */
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }
static void read_all(int fd, char *buf, size_t n) {
    for (ssize_t r; n > 0; buf += r, n -= (size_t)r)
        if ((r = read(fd, buf, n)) <= 0) { fputs("agent closed the connection\n", stderr); exit(1); }
}

/* One message (its frames joined, bit 31 of a length word: more follow), NUL-terminated. */
static char *receive(int ctl) {
    static char msg[1 << 20];
    size_t len = 0;
    for (unsigned more = 1; more;) {
        uint32_t word;
        read_all(ctl, (char *)&word, 4);
        word = ntohl(word), more = word >> 31, word &= 0x7fffffff;
        if (len + word >= sizeof msg) { fputs("reply too large\n", stderr); exit(1); }
        read_all(ctl, msg + len, word), len += word;
    }
    msg[len] = 0;
    return msg;
}

int main(int argc, char **argv) {
    if (argc < 5) { fputs("usage: CONTROL IPV4 PORT GENERATION [--activate]\n", stderr); return 2; }
    int one = 1, lst = socket(AF_INET, SOCK_STREAM, 0), ctl = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_in in = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
    struct sockaddr_un un = { .sun_family = AF_UNIX };
    inet_pton(AF_INET, argv[2], &in.sin_addr);
    strncpy(un.sun_path, argv[1], sizeof un.sun_path - 1);
    if (setsockopt(lst, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) || bind(lst, (void *)&in, sizeof in)
        || listen(lst, 4096)) die("listen");
    if (connect(ctl, (void *)&un, sizeof un)) die(argv[1]);

    char body[512], *reply;
    int n = snprintf(body + 4, sizeof body - 4, "{\"v\":1,\"op\":\"register\",\"group\":\"tcp://%s:%s\","
                     "\"generation\":%s,\"name\":\"c\",\"activate\":%s}", argv[2], argv[3], argv[4],
                     argc > 5 && !strcmp(argv[5], "--activate") ? "true" : "false");
    *(uint32_t *)body = htonl((uint32_t)n);
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm = {0};
    struct iovec iov = { body, (size_t)n + 4 };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf };
    cm.h.cmsg_level = SOL_SOCKET, cm.h.cmsg_type = SCM_RIGHTS, cm.h.cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(&cm.h), &lst, sizeof lst);
    if (sendmsg(ctl, &mh, 0) != n + 4) die("sendmsg");
    if (!strstr(reply = receive(ctl), "\"type\":\"registered\"")) { fprintf(stderr, "refused: %s\n", reply); return 1; }
    printf("registered: %s\n", reply), fflush(stdout);

    for (struct pollfd p[2] = {{ctl, POLLIN, 0}, {lst, POLLIN, 0}};;) {
        if (poll(p, 2, -1) < 0) die("poll");
        if (p[0].revents) { /* the agent pushes every change of our generation's state */
            reply = receive(ctl);
            printf("pushed: %s\n", reply), fflush(stdout);
            if (strstr(reply, "\"state\":\"draining\"")) break;
        }
        if (!(p[1].revents & POLLIN)) continue;
        int c = accept(lst, NULL, NULL);
        char line[64] = {0}, out[64];
        unsigned long long req;
        if (c >= 0 && read(c, line, sizeof line - 1) > 0 && sscanf(line, "req %llu", &req) == 1)
            (void)!write(c, out, (size_t)snprintf(out, sizeof out, "gen %s %llu\n", argv[4], req + 1));
        close(c);
    }
    close(lst); /* queued connections migrate to the active generation */
    return 0;
}
