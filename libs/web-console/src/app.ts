// Corral's web console: sign in, list and create sessions, chat with live streaming output,
// approve or deny tool requests, interrupt, see usage; the session's files (files.ts) and the
// reports page (reports.ts). Plain DOM on the TypeScript SDK; the session stream resumes by
// sequence after a dropped connection (shown as "reconnecting").
import { Code, ConnectError, createCorral } from "../../ts-sdk/src/index.js";
import type { Corral, StreamState } from "../../ts-sdk/src/index.js";
import type { TokenGrant } from "../../ts-sdk/src/gen/corral/identity/v1/identity_service_pb.js";
import {
  AgentOptions_PermissionMode,
  PermissionRule_Action,
} from "../../ts-sdk/src/gen/corral/session/v1/agent_options_pb.js";
import { TurnResult_Status } from "../../ts-sdk/src/gen/corral/session/v1/event_pb.js";
import type { SessionEvent } from "../../ts-sdk/src/gen/corral/session/v1/event_pb.js";
import { PermissionDecision_Decision } from "../../ts-sdk/src/gen/corral/session/v1/permission_pb.js";
import { Session_State } from "../../ts-sdk/src/gen/corral/session/v1/session_pb.js";
import type { Session } from "../../ts-sdk/src/gen/corral/session/v1/session_pb.js";
import type { Usage } from "../../ts-sdk/src/gen/corral/session/v1/usage_pb.js";
import { SendMessageRequest_BusyStrategy } from "../../ts-sdk/src/gen/corral/session/v1/session_service_pb.js";
import { $, describe, el, toast, usd } from "./dom.js";
import { FilesPanel } from "./files.js";
import type { FilesDebug } from "./files.js";
import { ReportsPage } from "./reports.js";
import type { ReportsDebug } from "./reports.js";

const TOKEN_KEY = "corral.token";
const USER_KEY = "corral.user";
const REFRESH_KEY = "corral.refresh";
const EXPIRY_KEY = "corral.expiry"; // the access token's expiry, ms since the epoch
const REFRESH_MARGIN_MS = 60_000;

/** What the page exposes for tests and debugging: the sequences rendered, in order. */
interface ConsoleDebug {
  rendered: number[];
  session: string;
  connection: StreamState;
  files: FilesDebug;
  reports: ReportsDebug;
}
declare global {
  interface Window {
    corralConsole: ConsoleDebug;
  }
}

function stateName(state: Session_State): string {
  return (Session_State[state] ?? "UNKNOWN").replace(/^STATE_/, "").toLowerCase().replace(/_/g, " ");
}

class Console {
  private corral: Corral;
  /** Anonymous calls (RefreshToken) that must not ask getToken for a token. */
  private anonymous: Corral;
  private refreshing: Promise<string> | undefined;
  private token = sessionStorage.getItem(TOKEN_KEY) ?? "";
  private user = sessionStorage.getItem(USER_KEY) ?? "";
  private selected = "";
  private stream: AbortController | undefined;
  private running = false;
  /** Per-session view state, rebuilt from the stream on every selection. */
  private blocks = new Map<string, HTMLElement>();
  private tools = new Map<string, HTMLElement>();
  private permissions = new Map<string, HTMLElement>();
  private files: FilesPanel;
  private reports: ReportsPage;
  readonly debug: ConsoleDebug;

  constructor(edgeUrl: string) {
    this.corral = createCorral({ baseUrl: edgeUrl, getToken: () => this.currentToken() });
    this.anonymous = createCorral({ baseUrl: edgeUrl });
    const guard = <T>(call: () => Promise<T>) => this.guard(call);
    this.files = new FilesPanel(this.corral, guard);
    this.reports = new ReportsPage(this.corral, guard, (name) => {
      location.hash = "#sessions";
      void this.select(name);
    });
    this.debug = {
      rendered: [],
      session: "",
      connection: "closed",
      files: this.files.debug,
      reports: this.reports.debug,
    };
    window.corralConsole = this.debug;
    window.addEventListener("hashchange", () => {
      if (this.token) void this.route();
    });
    $("login-form").addEventListener("submit", (e) => (e.preventDefault(), void this.login()));
    $("logout").addEventListener("click", () => this.logout());
    $("new-session").addEventListener("submit", (e) => (e.preventDefault(), void this.create()));
    $("refresh-sessions").addEventListener("click", () => void this.refresh());
    $("composer").addEventListener("submit", (e) => (e.preventDefault(), void this.send()));
    $("message").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        void this.send();
      }
    });
    $("interrupt").addEventListener("click", () => void this.interrupt());
  }

  start(): void {
    if (this.token) void this.enter();
    else this.showLogin();
  }

  // ---- sign-in ----

  private showLogin(message = ""): void {
    this.stream?.abort();
    $("login-view").hidden = false;
    $("app-view").hidden = true;
    $("reports-view").hidden = true;
    $("nav").hidden = true;
    $("logout").hidden = true;
    $("who").textContent = "";
    $("login-error").textContent = message;
    $<HTMLInputElement>("login-email").focus();
  }

  private async login(): Promise<void> {
    const email = $<HTMLInputElement>("login-email").value.trim();
    const password = $<HTMLInputElement>("login-password").value;
    $("login-error").textContent = "";
    try {
      const reply = await this.anonymous.identity.login({ email, password });
      this.keep(reply.token);
      this.user = reply.user?.name ?? "";
      sessionStorage.setItem(USER_KEY, this.user);
      $("who").textContent = reply.user?.email ?? email;
      $<HTMLInputElement>("login-password").value = "";
      await this.enter();
    } catch (error) {
      $("login-error").textContent =
        ConnectError.from(error).code === Code.Unauthenticated
          ? "Wrong email or password."
          : describe(error);
    }
  }

  private keep(grant: TokenGrant | undefined): void {
    this.token = grant?.accessToken ?? "";
    const expiry = grant?.accessTokenExpireTime;
    const expiresAt = expiry ? Number(expiry.seconds) * 1000 + Math.floor(expiry.nanos / 1e6) : 0;
    sessionStorage.setItem(TOKEN_KEY, this.token);
    sessionStorage.setItem(REFRESH_KEY, grant?.refreshToken ?? "");
    sessionStorage.setItem(EXPIRY_KEY, String(expiresAt));
  }

  /** The access token for the next call, refreshed (once, for all callers) shortly before it
   * expires; the refresh token rotates with it. */
  private async currentToken(): Promise<string> {
    const expiresAt = Number(sessionStorage.getItem(EXPIRY_KEY) ?? 0);
    const refreshToken = sessionStorage.getItem(REFRESH_KEY) ?? "";
    if (!this.token || !refreshToken || !expiresAt || Date.now() < expiresAt - REFRESH_MARGIN_MS) {
      return this.token;
    }
    this.refreshing ??= this.anonymous.identity
      .refreshToken({ refreshToken })
      .then((reply) => {
        this.keep(reply.token);
        return this.token;
      })
      .catch(() => this.token) // the call then fails UNAUTHENTICATED: back to sign in
      .finally(() => (this.refreshing = undefined));
    return this.refreshing;
  }

  private logout(): void {
    const refreshToken = sessionStorage.getItem(REFRESH_KEY) ?? "";
    if (refreshToken) {
      // Revoke the refresh token; the short-lived access token simply expires.
      this.anonymous.identity.logout({ refreshToken }).catch(() => undefined);
    }
    this.token = "";
    this.user = "";
    for (const key of [TOKEN_KEY, USER_KEY, REFRESH_KEY, EXPIRY_KEY]) sessionStorage.removeItem(key);
    this.selected = "";
    this.showLogin();
  }

  /** Any call answered UNAUTHENTICATED (an expired token) sends the user back to sign in. */
  private async guard<T>(call: () => Promise<T>): Promise<T | undefined> {
    try {
      return await call();
    } catch (error) {
      if (ConnectError.from(error).code === Code.Unauthenticated) {
        this.logout();
        $("login-error").textContent = "Your session expired: sign in again.";
      } else {
        toast(describe(error));
      }
      return undefined;
    }
  }

  private async enter(): Promise<void> {
    $("login-view").hidden = true;
    $("logout").hidden = false;
    $("nav").hidden = false;
    if (!$("who").textContent) $("who").textContent = this.user.split("/").pop() ?? "";
    await this.route();
  }

  /** The view the URL's fragment names: `#sessions` (default), `#reports`, `#reports/{id}`. */
  private async route(): Promise<void> {
    const hash = decodeURIComponent(location.hash.slice(1));
    const reports = hash === "reports" || hash.startsWith("reports/");
    const wasReports = !$("reports-view").hidden;
    $("app-view").hidden = reports;
    $("reports-view").hidden = !reports;
    for (const link of $("nav").querySelectorAll<HTMLAnchorElement>("a")) {
      link.classList.toggle("current", link.dataset.view === (reports ? "reports" : "sessions"));
    }
    if (reports) {
      if (!wasReports) await this.reports.list(false);
      if (hash.startsWith("reports/")) await this.reports.show(hash);
    } else {
      await this.refresh();
      void this.refreshUsageReport();
    }
  }

  // ---- sessions ----

  private async refresh(): Promise<void> {
    const reply = await this.guard(() =>
      this.corral.session.listSessions({ pageSize: 100, orderBy: "create_time desc" }),
    );
    if (reply === undefined) return;
    const list = $("sessions");
    list.replaceChildren(
      ...reply.sessions.map((session) => {
        const item = el(
          "li",
          { "data-name": session.name, class: session.name === this.selected ? "selected" : "" },
          el("span", { class: "title" }, session.displayName || session.name),
          el("span", { class: "state" }, stateName(session.state)),
        );
        item.addEventListener("click", () => void this.select(session.name));
        return item;
      }),
    );
    if (reply.sessions.length === 0) {
      list.append(el("li", { class: "muted" }, "No sessions yet."));
    }
  }

  private async create(): Promise<void> {
    const name = $<HTMLInputElement>("new-session-name").value.trim();
    const ask = $<HTMLSelectElement>("new-session-permissions").value === "ask";
    // "ask": one rule, every tool (`*`) waits for a person (a PermissionRequest answered here);
    // "allow": one rule allowing every tool. A rule, not PERMISSION_MODE_BYPASS_PERMISSIONS,
    // which an organisation's policy refuses unless it lists it; the organisation's own rules
    // are checked first either way, so what it makes ASK or DENY still asks or is denied.
    const agentOptions = {
      permissionMode: AgentOptions_PermissionMode.DEFAULT,
      permissionRules: [
        { toolPattern: "*", action: ask ? PermissionRule_Action.ASK : PermissionRule_Action.ALLOW },
      ],
    };
    const reply = await this.guard(() =>
      this.corral.session.createSession({
        session: { displayName: name || "untitled", agentOptions },
        requestId: crypto.randomUUID(),
      }),
    );
    if (reply?.session === undefined) return;
    $<HTMLInputElement>("new-session-name").value = "";
    this.selected = reply.session.name;
    await this.refresh();
    await this.select(reply.session.name);
  }

  private async select(name: string): Promise<void> {
    this.stream?.abort();
    this.selected = name;
    this.running = false;
    this.blocks.clear();
    this.tools.clear();
    this.permissions.clear();
    this.debug.rendered = [];
    this.debug.session = name;
    $("events").replaceChildren();
    this.files.show("");
    for (const item of $("sessions").querySelectorAll("li")) {
      item.classList.toggle("selected", item.dataset.name === name);
    }
    $<HTMLTextAreaElement>("message").disabled = false;
    $<HTMLButtonElement>("send").disabled = false;
    this.updateButtons();
    await this.refreshSession();
    $<HTMLTextAreaElement>("message").focus();
    void this.follow(name);
  }

  private async refreshSession(): Promise<void> {
    const name = this.selected;
    const reply = await this.guard(() => this.corral.session.getSession({ name }));
    if (reply?.session === undefined || name !== this.selected) return;
    this.showSession(reply.session);
  }

  private showSession(session: Session): void {
    if (session.workspace !== this.files.debug.workspace) this.files.show(session.workspace);
    $("session-title").textContent = session.displayName || session.name;
    $("session-title").title = session.name;
    $("session-state").textContent = stateName(session.state);
    this.showUsage($("session-usage"), session.usage, session.turnCount);
  }

  private showUsage(target: HTMLElement, usage: Usage | undefined, turns: number): void {
    const rows: [string, string][] = [
      ["turns", String(turns)],
      ["input tokens", String(usage?.inputTokens ?? 0n)],
      ["output tokens", String(usage?.outputTokens ?? 0n)],
      ["cost", usd(usage?.costUsdMicros ?? 0n)],
    ];
    target.replaceChildren(
      ...rows.flatMap(([key, value]) => [el("dt", {}, key), el("dd", { "data-usage": key }, value)]),
    );
  }

  private async refreshUsageReport(): Promise<void> {
    if (!this.user) return;
    const reply = await this.guard(() =>
      this.corral.identity.getUsageReport({ name: `${this.user}/usageReport` }),
    );
    const totals = reply?.usageReport?.totals;
    if (totals === undefined) return;
    const rows: [string, string][] = [
      ["session turns", String(totals.sessionTurns)],
      ["task runs", String(totals.taskRuns)],
      ["tokens", String(totals.tokens)],
      ["cost", usd(totals.costUsdMicros)],
    ];
    $("usage-totals").replaceChildren(
      ...rows.flatMap(([key, value]) => [el("dt", {}, key), el("dd", {}, value)]),
    );
  }

  // ---- the live stream ----

  private setConnection(state: StreamState, error?: ConnectError): void {
    this.debug.connection = state;
    const badge = $("connection");
    badge.dataset.state = state;
    badge.textContent = state === "closed" ? "" : state === "live" ? "live" : `${state}…`;
    badge.title = error ? describe(error) : "";
  }

  private async follow(name: string): Promise<void> {
    const controller = new AbortController();
    this.stream = controller;
    try {
      for await (const event of this.corral.streamSessionEvents(name, {
        signal: controller.signal,
        onState: (state, error) => {
          if (!controller.signal.aborted) this.setConnection(state, error);
        },
      })) {
        if (controller.signal.aborted) break;
        this.render(event);
      }
    } catch (error) {
      if (!controller.signal.aborted) {
        if (ConnectError.from(error).code === Code.Unauthenticated) this.logout();
        else toast(describe(error));
      }
    }
  }

  private append(node: HTMLElement, event: SessionEvent): HTMLElement {
    node.classList.add("event");
    node.dataset.sequence = String(event.sequence);
    $("events").append(node);
    return node;
  }

  private block(event: SessionEvent, messageId: string, index: number, kind: string): HTMLElement {
    const key = `${event.turnId}/${messageId}/${index}/${kind}`;
    let node = this.blocks.get(key);
    if (node === undefined) {
      node = this.append(el("div", { class: kind, "data-turn": event.turnId }), event);
      this.blocks.set(key, node);
    }
    return node;
  }

  private render(event: SessionEvent): void {
    const box = $("events");
    const following = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
    this.renderEvent(event);
    if (following) box.scrollTop = box.scrollHeight; // stay at the bottom while it streams
    this.updateButtons();
  }

  private renderEvent(event: SessionEvent): void {
    this.debug.rendered.push(Number(event.sequence));
    const payload = event.payload;
    switch (payload.case) {
      case "userMessage":
        this.append(el("div", { class: "user-message" }, payload.value.text), event);
        break;
      case "turnStarted":
        this.running = true;
        break;
      case "textDelta": {
        const { messageId, index, text } = payload.value;
        const node = this.block(event, messageId, index, "assistant-text");
        node.append(text);
        node.dataset.streaming = "true";
        break;
      }
      case "textBlock": {
        const { messageId, index, text } = payload.value;
        const node = this.block(event, messageId, index, "assistant-text");
        node.textContent = text; // the whole block: what the deltas added up to
        delete node.dataset.streaming;
        break;
      }
      case "thinkingDelta": {
        const { messageId, index, thinking } = payload.value;
        this.block(event, messageId, index, "thinking").append(thinking);
        break;
      }
      case "thinkingBlock": {
        const { messageId, index, thinking } = payload.value;
        this.block(event, messageId, index, "thinking").textContent = thinking;
        break;
      }
      case "toolUse": {
        const { id, name, input } = payload.value;
        const args = JSON.stringify(input ?? {});
        const node = this.append(
          el(
            "div",
            { class: "tool-call", "data-tool-use-id": id, "data-tool": name },
            el("span", { class: "tool-name" }, `⚙ ${name}`),
            " ",
            el("span", { class: "tool-input" }, args),
          ),
          event,
        );
        this.tools.set(id, node);
        break;
      }
      case "toolResult": {
        const { toolUseId, content, isError, contentTruncated } = payload.value;
        const text = content + (contentTruncated ? "\n… (truncated)" : "");
        const node = el(
          "div",
          { class: `tool-result${isError ? " is-error" : ""}`, "data-tool-use-id": toolUseId },
          `↳ ${text}`,
        );
        this.append(node, event);
        break;
      }
      case "permissionRequest": {
        const request = payload.value;
        const args = JSON.stringify(request.input ?? {});
        const allow = el("button", { type: "button", class: "allow" }, "Allow");
        const deny = el("button", { type: "button", class: "deny secondary" }, "Deny");
        const node = this.append(
          el(
            "div",
            { class: "permission-request", "data-request-id": request.id },
            el("div", {}, `Allow ${request.toolName}? `, el("code", {}, args)),
            request.reason ? el("div", { class: "muted" }, request.reason) : "",
            el("div", { class: "buttons" }, allow, deny),
          ),
          event,
        );
        allow.addEventListener("click", () => void this.decide(request.id, true, node));
        deny.addEventListener("click", () => void this.decide(request.id, false, node));
        this.permissions.set(request.id, node);
        break;
      }
      case "permissionDecision": {
        const decision = payload.value;
        const node = this.permissions.get(decision.permissionRequestId);
        const allowed = decision.decision === PermissionDecision_Decision.ALLOW;
        const verdict = `${allowed ? "allowed" : "denied"}${decision.message ? `: ${decision.message}` : ""}`;
        if (node !== undefined) {
          node.querySelector(".buttons")?.replaceChildren(el("span", { class: "verdict" }, verdict));
          node.dataset.decision = allowed ? "allow" : "deny";
        }
        break;
      }
      case "turnResult": {
        const result = payload.value;
        const status = (TurnResult_Status[result.status] ?? "UNKNOWN").replace(/^STATUS_/, "").toLowerCase();
        const tokens = (result.usage?.inputTokens ?? 0n) + (result.usage?.outputTokens ?? 0n);
        const parts = [status, `${tokens} tokens`, usd(result.usage?.costUsdMicros ?? 0n)];
        this.append(
          el("div", { class: `turn-result status-${status.replace(/_/g, "-")}`, "data-status": status }, parts.join(" · ")),
          event,
        );
        if (result.error?.message) {
          this.append(el("div", { class: "error-event" }, result.error.message), event);
        }
        this.running = false;
        for (const node of this.permissions.values()) {
          const buttons = node.querySelector(".buttons");
          if (buttons?.querySelector("button")) buttons.replaceChildren(el("span", { class: "verdict" }, "expired"));
        }
        void this.refreshSession();
        void this.refreshUsageReport();
        this.files.refreshSoon(); // what the agent wrote in this turn
        break;
      }
      case "error":
        this.append(el("div", { class: "error-event" }, `error: ${payload.value.message}`), event);
        break;
      case "stateChanged":
        $("session-state").textContent = stateName(payload.value.state);
        for (const item of $("sessions").querySelectorAll<HTMLElement>("li")) {
          if (item.dataset.name === event.session) {
            const state = item.querySelector(".state");
            if (state) state.textContent = stateName(payload.value.state);
          }
        }
        break;
      default:
        break; // usage, heartbeats and kinds this console does not know
    }
  }

  private updateButtons(): void {
    $<HTMLButtonElement>("interrupt").disabled = !this.running;
  }

  // ---- actions ----

  private async send(): Promise<void> {
    const box = $<HTMLTextAreaElement>("message");
    const text = box.value.trim();
    if (!text || !this.selected) return;
    box.value = "";
    const session = this.selected;
    const reply = await this.guard(() =>
      this.corral.session.sendMessage({
        session,
        text,
        requestId: crypto.randomUUID(),
        busyStrategy: SendMessageRequest_BusyStrategy.ENQUEUE,
      }),
    );
    if (reply === undefined) box.value = text;
  }

  private async interrupt(): Promise<void> {
    const session = this.selected;
    $<HTMLButtonElement>("interrupt").disabled = true;
    await this.guard(() => this.corral.session.interruptTurn({ session }));
  }

  private async decide(id: string, allow: boolean, node: HTMLElement): Promise<void> {
    for (const button of node.querySelectorAll("button")) button.disabled = true;
    const session = this.selected;
    const reply = await this.guard(() =>
      this.corral.session.respondToPermission({
        session,
        permissionRequestId: id,
        decision: allow ? PermissionDecision_Decision.ALLOW : PermissionDecision_Decision.DENY,
        message: allow ? "" : "denied in the web console",
      }),
    );
    if (reply === undefined) {
      for (const button of node.querySelectorAll("button")) button.disabled = false;
    }
  }
}

async function main(): Promise<void> {
  // The edge's URL: ?edge=... (development, tests), else config.json from the server.
  const override = new URLSearchParams(location.search).get("edge");
  let edgeUrl = override ?? "";
  if (!edgeUrl) {
    try {
      const reply = await fetch("config.json", { cache: "no-store" });
      edgeUrl = ((await reply.json()) as { edgeUrl?: string }).edgeUrl ?? "";
    } catch {
      edgeUrl = "";
    }
  }
  new Console(edgeUrl || location.origin).start();
}

void main();
