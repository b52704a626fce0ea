// Decodes Sparkplug B payloads with Eclipse Tahu's JavaScript codec (npm: sparkplug-payload), an implementation
// independent of the agent's. Input: JSON lines {"topic", "payload" (base64)}; output: JSON lines {"topic",
// "payload" (decoded)} or {"topic", "error"}. 64-bit integers (Long) are written as decimal strings.
"use strict";
const readline = require("readline");
const sparkplug = require("sparkplug-payload").get("spBv1.0");

function plain(key, value) {
    if (value !== null && typeof value === "object" && typeof value.toString === "function" &&
        "low" in value && "high" in value) {
        return value.toString();
    }
    if (typeof value === "bigint") {
        return value.toString();
    }
    return value;
}

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
    const message = JSON.parse(line);
    try {
        const payload = sparkplug.decodePayload(Buffer.from(message.payload, "base64"));
        process.stdout.write(JSON.stringify({ topic: message.topic, payload: payload }, plain) + "\n");
    } catch (error) {
        process.stdout.write(JSON.stringify({ topic: message.topic, error: String(error) }) + "\n");
    }
});
