// corral-example signs in to Corral, creates a session, sends one message and prints that turn
// as it streams, ending with its result. The README's Go example; tests/clients runs it.
//
//	CORRAL_EMAIL=... CORRAL_PASSWORD=... corral-example -target 127.0.0.1:8080 -message "hello"
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path"
	"time"

	"corral.dev/client/corral"
	sessionv1 "corral.dev/client/gen/corral/session/v1"
)

func main() {
	target := flag.String("target", "127.0.0.1:8080", "Corral's edge, host:port")
	message := flag.String("message", "hello", "what to send the agent")
	flag.Parse()
	if err := run(*target, *message); err != nil {
		fmt.Fprintf(os.Stderr, "corral-example: %v (reason %s)\n", err, corral.Reason(err))
		os.Exit(1)
	}
}

func run(target, message string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	client, err := corral.Dial(target)
	if err != nil {
		return err
	}
	defer client.Close()
	if _, err := client.Login(ctx, os.Getenv("CORRAL_EMAIL"), os.Getenv("CORRAL_PASSWORD")); err != nil {
		return err
	}
	created, err := client.Sessions.CreateSession(ctx, &sessionv1.CreateSessionRequest{
		Session:   &sessionv1.Session{DisplayName: "from Go"},
		RequestId: corral.RequestID(),
	})
	if err != nil {
		return err
	}
	session := created.GetSession().GetName()
	fmt.Println("session", session)
	sent, err := client.Sessions.SendMessage(ctx, &sessionv1.SendMessageRequest{
		Session: session, Text: message, RequestId: corral.RequestID(),
	})
	if err != nil {
		return err
	}
	turn := sent.GetTurn()
	turnID := path.Base(turn.GetName())
	return client.Events(ctx, session, turn.GetFirstSequence()-1, func(event *sessionv1.SessionEvent) error {
		if event.GetTurnId() != turnID {
			return nil
		}
		switch {
		case event.GetTextDelta() != nil:
			fmt.Print(event.GetTextDelta().GetText())
		case event.GetToolUse() != nil:
			fmt.Printf("\ntool %s\n", event.GetToolUse().GetName())
		case event.GetTurnResult() != nil:
			result := event.GetTurnResult()
			fmt.Printf("\nturn_result %s %d tokens\n", result.GetStatus(), result.GetUsage().GetOutputTokens())
			return corral.Stop
		}
		return nil
	})
}
