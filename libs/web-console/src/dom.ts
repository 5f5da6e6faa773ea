// Small DOM and formatting helpers shared by the console's views.
import { Code, ConnectError } from "../../ts-sdk/src/index.js";

/** google.protobuf.Timestamp as protobuf-es has it. */
interface Timestamp {
  seconds: bigint;
  nanos: number;
}

export const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`#${id} is missing`);
  return element as T;
};

/** An element with attributes and children; text children are text nodes, never markup. */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attributes: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") element.className = value;
    else element.setAttribute(key, value);
  }
  element.append(...children);
  return element;
}

export function usd(micros: bigint): string {
  return `$${(Number(micros) / 1e6).toFixed(4)}`;
}

const UNITS = ["KiB", "MiB", "GiB", "TiB"];

/** 532 B, 1.4 KiB, 12 MiB. */
export function bytes(count: bigint | number): string {
  let value = Number(count);
  if (value < 1024) return `${value} B`;
  let unit = -1;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${UNITS[unit]}`;
}

export function date(timestamp: Timestamp | undefined): Date | undefined {
  if (timestamp === undefined) return undefined;
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6));
}

const SHORT = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "short" });

/** A <time> with a short local date and time, the full ISO form on hover. */
export function time(timestamp: Timestamp | undefined): HTMLTimeElement | string {
  const when = date(timestamp);
  if (when === undefined) return "";
  const iso = when.toISOString();
  return el("time", { datetime: iso, title: iso }, SHORT.format(when));
}

export function describe(error: unknown): string {
  const connect = ConnectError.from(error);
  return `${Code[connect.code] ?? connect.code}: ${connect.rawMessage || connect.message}`;
}

export function isCode(error: unknown, code: Code): boolean {
  return ConnectError.from(error).code === code;
}

let toastTimer: ReturnType<typeof setTimeout> | undefined;
export function toast(message: string): void {
  const box = $("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), 6000);
}

/** Saves a Blob under a file name (an object URL the browser downloads, then let go). */
export function save(blob: Blob, filename: string): void {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: filename, hidden: "" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** Runs a call; an UNAUTHENTICATED answer signs the user out, any other error is shown. */
export type Guard = <T>(call: () => Promise<T>) => Promise<T | undefined>;
