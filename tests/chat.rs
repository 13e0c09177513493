//! Chatting through real sockets: rooms, messages, presence, nicknames,
//! history and room limits.

mod support;

use serde_json::json;
use support::raw::{RawClient, masked_frame};
use support::{Client, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_chat_in_a_room() {
    let server = TestServer::start().await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    assert_eq!(alice.welcome["protocol"], 1);
    assert_eq!(alice.welcome["user"]["nick"], "Alice");
    assert_eq!(alice.welcome["user"]["roles"], json!(["member"]));
    assert!(alice.welcome["limits"]["max_message_bytes"].as_u64().is_some());

    alice.join("lobby").await;
    let joined = bob.join("lobby").await;
    assert_eq!(joined["member_count"], 2);
    let presence = alice.recv().await;
    assert_eq!(
        (&presence["type"], &presence["event"], &presence["user"]["nick"]),
        (&json!("presence"), &json!("join"), &json!("Bob"))
    );

    alice.send(json!({"type": "message", "room": "lobby", "content": "Hello!", "ref": "m1"})).await;
    let echo = alice.recv().await;
    let ack = alice.recv().await;
    let received = bob.recv().await;
    assert_eq!(received, echo, "the sender and the room see the same frame");
    assert_eq!(received["type"], "message");
    assert_eq!(received["from"], "Alice");
    assert_eq!(received["content"], "Hello!");
    assert_eq!(received["room"], "lobby");
    assert_eq!(received["id"], 1);
    assert!(received["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000));
    assert_eq!((&ack["type"], &ack["ref"], &ack["id"]), (&json!("ack"), &json!("m1"), &json!(1)));

    bob.send(json!({"type": "message", "room": "lobby", "content": "Hi Alice"})).await;
    let reply = alice.recv().await;
    assert_eq!((&reply["from"], &reply["content"], &reply["id"]), (&json!("Bob"), &json!("Hi Alice"), &json!(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_isolated() {
    let server = TestServer::start().await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    alice.join("red").await;
    bob.join("blue").await;
    alice.post("red", "only for red").await;
    bob.post("blue", "only for blue").await;
    // Bob's next frame is the echo of his own message, never Alice's.
    let mut carol = server.client("Carol").await;
    carol.join("red").await;
    bob.send(json!({"type": "message", "room": "red", "content": "sneaky", "ref": 9})).await;
    let error = bob.recv().await;
    assert_eq!((&error["code"], &error["ref"]), (&json!("not_member"), &json!(9)));
    alice.post("red", "second").await;
    let frame = carol.recv().await;
    assert_eq!(frame["content"], "second", "carol sees red only: {frame}");
    // Had red's traffic reached Bob, "second" would arrive before this echo.
    bob.send(json!({"type": "message", "room": "blue", "content": "check"})).await;
    let frame = bob.recv().await;
    assert_eq!((&frame["room"], &frame["content"]), (&json!("blue"), &json!("check")), "{frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_join_leave_and_disconnect() {
    let server = TestServer::start().await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    let mut carol = server.client("Carol").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    assert_eq!(alice.recv().await["event"], "join");

    bob.send(json!({"type": "leave", "room": "lobby", "ref": "l"})).await;
    let left = bob.recv().await;
    assert_eq!((&left["type"], &left["room"], &left["ref"]), (&json!("left"), &json!("lobby"), &json!("l")));
    let presence = alice.recv().await;
    assert_eq!((&presence["event"], &presence["user"]["nick"]), (&json!("leave"), &json!("Bob")));

    let joined = carol.join("lobby").await;
    assert_eq!(joined["member_count"], 2);
    let nicks: Vec<_> = joined["members"].as_array().unwrap().iter().map(|m| m["nick"].clone()).collect();
    assert!(nicks.contains(&json!("Alice")) && nicks.contains(&json!("Carol")), "{joined}");
    assert_eq!(alice.recv().await["user"]["nick"], "Carol");

    drop(carol);
    let presence = alice.recv().await;
    assert_eq!((&presence["event"], &presence["user"]["nick"]), (&json!("leave"), &json!("Carol")));
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nicknames_are_validated_unique_and_changeable() {
    let server = TestServer::start().await;
    let mut alice = server.client("Alice").await;

    // Taken, compared case-insensitively: the client gets a guest name and an error.
    let mut other = Client::connect(&server.ws_url(Some("aLiCe"))).await;
    assert!(other.nick().starts_with("guest-"), "{}", other.welcome);
    assert_eq!(other.recv().await["code"], "nick_taken");

    // Invalid in the URL.
    let mut bad = Client::connect(&server.ws_url(Some("no%20spaces"))).await;
    assert!(bad.nick().starts_with("guest-"));
    assert_eq!(bad.recv().await["code"], "invalid_nick");

    // No nickname at all: guest-NNNN.
    let guest = Client::connect(&server.ws_url(None)).await;
    let nick = guest.nick();
    assert!(nick.len() >= "guest-1000".len() && nick[6..].chars().all(|c| c.is_ascii_digit()), "{nick}");

    // Rename, with presence in rooms.
    alice.join("lobby").await;
    other.join("lobby").await;
    assert_eq!(alice.recv().await["event"], "join");
    other.send(json!({"type": "nick", "nick": "ALICE", "ref": 1})).await;
    let error = other.recv().await;
    assert_eq!((&error["code"], &error["ref"]), (&json!("nick_taken"), &json!(1)));
    other.send(json!({"type": "nick", "nick": "x"})).await;
    assert_eq!(other.recv().await["code"], "invalid_nick");
    other.send(json!({"type": "nick", "nick": "Olga", "ref": 2})).await;
    let renamed = other.recv().await;
    assert_eq!((&renamed["type"], &renamed["user"]["nick"]), (&json!("renamed"), &json!("Olga")));
    let presence = alice.recv().await;
    assert_eq!(
        (&presence["event"], &presence["user"]["nick"], &presence["previous"]),
        (&json!("nick"), &json!("Olga"), &renamed["previous"])
    );
    other.post("lobby", "from olga").await;
    assert_eq!(alice.recv().await["from"], "Olga");

    // The old guest name is free again, and Alice's name frees on disconnect.
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let again = Client::connect(&server.ws_url(Some("alice"))).await;
    assert_eq!(again.nick(), "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_carries_recent_history_and_history_pages_backwards() {
    let server = TestServer::with_toml("[rooms]\nhistory_kept = 20\nhistory_on_join = 5\nhistory_page_max = 8\n").await;
    let mut alice = server.client("Alice").await;
    alice.join("lobby").await;
    for i in 1..=25 {
        alice.post("lobby", &format!("m{i}")).await;
    }
    let mut bob = server.client("Bob").await;
    let joined = bob.join("lobby").await;
    let ids: Vec<_> = joined["history"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [21, 22, 23, 24, 25]);
    assert_eq!(joined["history"][4]["content"], "m25");
    assert_eq!(joined["history"][4]["type"], "message");

    bob.send(json!({"type": "history", "room": "lobby", "before": 21, "limit": 100, "ref": "h"})).await;
    let page = bob.recv().await;
    let ids: Vec<_> = page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (13..=20).collect::<Vec<_>>(), "capped at history_page_max");
    assert_eq!((&page["more"], &page["ref"]), (&json!(true), &json!("h")));

    bob.send(json!({"type": "history", "room": "lobby", "before": 13})).await;
    let page = bob.recv().await;
    let ids: Vec<_> = page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (5..=12).collect::<Vec<_>>(), "older than what is kept in memory comes from the store");
    assert_eq!(page["more"], true);

    bob.send(json!({"type": "history", "room": "lobby", "before": 5})).await;
    let page = bob.recv().await;
    let ids: Vec<_> = page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    assert_eq!(page["more"], false);

    bob.send(json!({"type": "history", "room": "elsewhere"})).await;
    assert_eq!(bob.recv().await["code"], "not_member");
    bob.send(json!({"type": "history", "room": "lobby", "limit": 0})).await;
    let error = bob.recv().await;
    assert_eq!(error["code"], "bad_request", "a page of nothing, with more to come, is no answer: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_increase_per_room() {
    let server = TestServer::start().await;
    let mut alice = server.client("Alice").await;
    alice.join("a").await;
    alice.join("b").await;
    let mut acks = Vec::new();
    for (room, content) in [("a", "1"), ("b", "2"), ("a", "3"), ("a", "4"), ("b", "5")] {
        acks.push((room, alice.post(room, content).await["id"].as_u64().unwrap()));
    }
    assert_eq!(acks, [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_limits_are_enforced() {
    let server = TestServer::with_toml("[rooms]\nmax_rooms = 2\nmax_members = 2\nmax_rooms_per_connection = 2\n").await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    let mut carol = server.client("Carol").await;
    alice.join("one").await;
    bob.join("one").await;
    assert_eq!(alice.recv().await["event"], "join");
    carol.send(json!({"type": "join", "room": "one"})).await;
    assert_eq!(carol.recv().await["code"], "room_full");

    carol.join("two").await;
    carol.send(json!({"type": "join", "room": "three"})).await;
    assert_eq!(carol.recv().await["code"], "room_limit");

    alice.join("two").await;
    assert_eq!(carol.recv().await["event"], "join");
    alice.send(json!({"type": "join", "room": "one"})).await;
    assert_eq!(alice.recv().await["type"], "joined", "joining again is harmless");
    // Alice is in two rooms; a third is refused before the room limit.
    bob.send(json!({"type": "leave", "room": "one"})).await;
    assert_eq!(bob.recv().await["type"], "left");
    assert_eq!(alice.recv().await["event"], "leave");
    alice.send(json!({"type": "join", "room": "fresh"})).await;
    assert_eq!(alice.recv().await["code"], "too_many_rooms");

    for bad in ["", "has space", "a/b", &"r".repeat(65)] {
        carol.send(json!({"type": "join", "room": bad})).await;
        assert_eq!(carol.recv().await["code"], "invalid_room", "room {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_with_the_upgrade_request_are_answered_after_the_welcome() {
    let server = TestServer::start().await;
    let mut early = masked_frame(true, 1, br#"{"type":"join","room":"lobby"}"#);
    early.extend(masked_frame(true, 1, br#"{"type":"message","room":"lobby","content":"first","ref":1}"#));
    let mut eager = RawClient::connect_pipelined(server.addr, "/ws?nick=eager", &early).await;
    let mut kinds = Vec::new();
    for _ in 0..4 {
        let frame = eager.recv().await;
        assert_ne!(frame["type"], "error", "{frame}");
        kinds.push(frame["type"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(kinds, ["welcome", "joined", "message", "ack"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_churning_nicknames_and_rooms_is_held_to_its_request_budget() {
    // 6 a minute (one per 10 s) with a burst of 5.
    let server = TestServer::with_toml("[limits]\nrequests_per_minute = 6\nrequests_burst = 5\n").await;
    let mut churner = server.client("Churner").await;
    let mut bystander = server.client("Bystander").await;
    churner.join("lobby").await;
    bystander.join("lobby").await;
    assert_eq!(churner.recv().await["event"], "join");
    // The churner's join took one of the five.
    let mut renamed = 0;
    let mut limited = Vec::new();
    for i in 0..10 {
        churner.send(json!({"type": "nick", "nick": format!("Churner{i}"), "ref": i})).await;
        let answer = churner.recv().await;
        match answer["type"].as_str() {
            Some("renamed") => renamed += 1,
            Some("error") => limited.push(answer),
            _ => panic!("unexpected {answer}"),
        }
    }
    assert_eq!(renamed, 4, "{limited:?}");
    assert_eq!(limited.len(), 6);
    for error in &limited {
        assert_eq!(error["code"], "rate_limited", "{error}");
        let wait = error["retry_after_ms"].as_u64().expect("retry_after_ms");
        assert!((1..=10_000).contains(&wait), "{error}");
    }
    assert_eq!(limited[0]["ref"], 4);
    // The bystander saw only the four renames, and can still chat.
    for i in 0..4 {
        let presence = bystander.recv().await;
        assert_eq!(
            (presence["event"].as_str(), presence["user"]["nick"].as_str()),
            (Some("nick"), Some(&*format!("Churner{i}")))
        );
    }
    bystander.post("lobby", "still here").await;
    // Messages are not requests of this budget.
    let message = churner.recv().await;
    assert_eq!(message["content"], "still here", "{message}");
    churner.post("lobby", "me too").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_message_is_refused_and_not_delivered() {
    let server = TestServer::start().await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    assert_eq!(alice.recv().await["event"], "join");
    for content in ["", "   ", "\n\t \u{3000}"] {
        alice.send(json!({"type": "message", "room": "lobby", "content": content, "ref": 1})).await;
        let error = alice.recv().await;
        assert_eq!(
            (error["code"].as_str(), error["ref"].as_u64()),
            (Some("bad_request"), Some(1)),
            "{content:?}: {error}"
        );
    }
    alice.post("lobby", "hello").await;
    assert_eq!(bob.recv().await["content"], "hello", "Bob got nothing before it");
}
