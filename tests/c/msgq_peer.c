/*
 * msgq_peer: a small C program that talks to ipcbus.sysv.MessageQueue.
 *
 * It uses the message layout of the Linux IPC guide's msgsnd example: a
 * `long` type followed by a 256-byte text, sent with
 * msgsnd(id, &msg, sizeof(msg.msg_data), 0).
 *
 * Usage: msgq_peer KEY COUNT
 *   Opens the existing queue with key KEY, then COUNT times:
 *     receives the first message of type 1 (msgrcv(..., 1, 0)),
 *     answers it with a message of type 2 whose text is "C got: <text>".
 *   Finally sends one message of type 3, text "bye", and exits 0.
 *   Any failure prints the failing call and exits 1.
 *
 * Build: cc -O2 -Wall -o msgq_peer msgq_peer.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/types.h>

/* Standard message structure (from the guide). */
struct custom_msg {
    long msg_type;
    char msg_data[256];
};

/* The guide's send_message(), in C. */
static int send_message(int msq_id, long msg_type, const char *input_data)
{
    struct custom_msg send_buf;
    send_buf.msg_type = msg_type;
    memset(send_buf.msg_data, 0, sizeof(send_buf.msg_data));
    /* The guide uses strncpy + explicit NUL; snprintf does both (and keeps
       -Wall quiet about truncation, which is intended here). */
    snprintf(send_buf.msg_data, sizeof(send_buf.msg_data), "%s", input_data);
    if (msgsnd(msq_id, &send_buf, sizeof(send_buf.msg_data), 0) == -1) {
        perror("msgsnd failed");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s KEY COUNT\n", argv[0]);
        return 2;
    }
    key_t key = (key_t)strtol(argv[1], NULL, 0);
    long count = strtol(argv[2], NULL, 0);

    int msq_id = msgget(key, 0600);
    if (msq_id == -1) {
        perror("msgget failed");
        return 1;
    }

    for (long i = 0; i < count; i++) {
        struct custom_msg recv_buf;
        ssize_t n = msgrcv(msq_id, &recv_buf, sizeof(recv_buf.msg_data), 1, 0);
        if (n == -1) {
            perror("msgrcv failed");
            return 1;
        }
        recv_buf.msg_data[sizeof(recv_buf.msg_data) - 1] = '\0';
        char reply[256];
        snprintf(reply, sizeof(reply), "C got: %.240s", recv_buf.msg_data);
        if (send_message(msq_id, 2, reply) == -1)
            return 1;
    }
    if (send_message(msq_id, 3, "bye") == -1)
        return 1;
    return 0;
}
